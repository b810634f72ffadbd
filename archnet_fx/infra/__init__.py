"""archnet_fx.infra."""
