"""Built-in demo models (:mod:`~archnet_fx.demo.zoo`: MLP, CNN, ViT, BERT-like, decoder, the
real all-MiniLM-L6-v2) and real unlabeled data (:mod:`~archnet_fx.demo.data`: Lee sentences,
digits), for the CLI, the tests and the benchmarks. Nothing in the core imports them."""
