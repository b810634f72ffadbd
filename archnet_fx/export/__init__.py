"""archnet_fx.export."""
