"""archnet_fx.surrogate."""
