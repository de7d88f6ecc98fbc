"""Evaluation library: pure functions on tensors, usable without the pipelines.

- :mod:`eval.reconstruction`: per-image MSE / PSNR / SSIM and one tokenizer pass over a split.
- :mod:`eval.fid`: feature extractors (offline classifier, label-free contrastive backbone, Inception, DINOv2)
  and FID / KID / precision-recall through torch-fidelity's own stages, with cached reference features.
- :mod:`eval.features`: the offline classifier extractor (trained on the data's labels, cached) and the
  cache / backbone helpers the extractors share.
- :mod:`eval.contrastive`: the label-free extractor (SimCLR-style NT-Xent on the train images, no labels,
  cached, with a k-NN quality check).
- :mod:`eval.prdc`: precision, recall, density and coverage with chunked k-NN.
- :mod:`eval.diversity`: code usage / perplexity, code spread (shrinkage), token histograms, mode coverage.
- :mod:`eval.dinov2`: DINOv2 features through ``transformers`` (FD-DINOv2), registered with torch-fidelity.
- :mod:`eval.weights`: the published extractors' weight files, their sha256 checks and safe loading.
- :mod:`eval.protocols`: evaluation protocols by name (``inception-50k``, ``fd-dinov2``, ``rfid-val``).
- :mod:`eval.streaming`: FID statistics and a k-NN subset of large image sets, one batch at a time.
- :mod:`eval.image_sets`: folders of image files and ADM-style ``.npz`` batches, read and written in batches.
- :mod:`eval.caveats`: where a report's numbers mislead (small counts, near-chance extractors, unknown weights).
- :mod:`eval.plots` and :mod:`eval.report`: figures and JSON / Markdown / HTML reports.
- :mod:`eval.progress`: progress bars of long phases.
"""
