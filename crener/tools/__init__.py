"""Tools that serve the model but are not the model: speed and memory benchmarks (``bench``,
``roofline``), the one-command GPU check (``gpucheck``), encoder pretraining (``pretrain``) and
checkpoint migration (``migrate``). The model, its training loop and inference never import them."""
