"""OpenAI's fine-tuning API (``/v1/fine_tuning/jobs``) over the embedded trainer's job store."""
