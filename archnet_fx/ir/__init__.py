"""archnet_fx.ir."""
