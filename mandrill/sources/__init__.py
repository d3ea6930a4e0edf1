"""Message sources: the in-process broker and Google Cloud Pub/Sub."""

from mandrill.sources.base import Source, Topic

__all__ = ["Source", "Topic"]
