"""One router per resource: finetune, jobs, segment, models, health."""
