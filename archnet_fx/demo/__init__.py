"""archnet_fx.demo."""
