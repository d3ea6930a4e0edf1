"""Pub/Sub resource names: a short name in a project, or a full path kept as it is."""

from __future__ import annotations


def topic_path(project: str, topic: str) -> str:
    """``projects/P/topics/T``; a name that already is a full path is kept as it is."""
    return topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    """``projects/P/subscriptions/S``; a full path is kept as it is."""
    if subscription.startswith("projects/"):
        return subscription
    return f"projects/{project}/subscriptions/{subscription}"
