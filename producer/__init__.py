"""genq's producer side: everything a submitting machine needs (never imports torch)."""

from producer.client import Client, Job

__all__ = ["Client", "Job"]
