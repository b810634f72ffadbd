"""archnet_fx.cost."""
