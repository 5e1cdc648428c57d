"""Uploaded files (OpenAI's ``/v1/files``): fine-tuning datasets kept in the data dir."""
