"""Data: public formats (LLaVA conversation JSON, RLAIF-V preference pairs), chat templates, collators."""
