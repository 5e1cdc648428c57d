"""Training jobs of the gateway: persistence, the job manager, metrics (the HTTP routes are in
``gateway.api.admin_training``; the trainer itself is ``adapters.training``)."""
