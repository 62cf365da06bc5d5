"""One router per resource: detect, models, jobs, health."""
