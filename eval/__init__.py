"""Evaluation library: pure functions on tensors, usable without the pipelines.

- :mod:`eval.reconstruction`: per-image MSE / PSNR / SSIM and one tokenizer pass over a split.
- :mod:`eval.fid`: feature extractors (offline classifier, label-free contrastive backbone or Inception)
  and FID / KID / precision-recall through torch-fidelity's own stages, with cached reference features.
- :mod:`eval.features`: the offline classifier extractor (trained on the data's labels, cached) and the
  cache / backbone helpers the extractors share.
- :mod:`eval.contrastive`: the label-free extractor (SimCLR-style NT-Xent on the train images, no labels,
  cached, with a k-NN quality check).
- :mod:`eval.prdc`: precision, recall, density and coverage with chunked k-NN.
- :mod:`eval.diversity`: code usage / perplexity, code spread (shrinkage), token histograms, mode coverage.
- :mod:`eval.plots` and :mod:`eval.report`: figures and JSON / Markdown / HTML reports.
"""
