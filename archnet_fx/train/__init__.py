"""archnet_fx.train."""
