"""The queue layer: the only place Celery and kombu are imported (app, task, routing,
redelivery, publishing, kombu's message layout)."""
