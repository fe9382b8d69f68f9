"""A CreateTopics answer is read for its refusals: aiokafka returns it rather than raising, so a
creation the broker refused (no CreateTopics right under ACLs) used to pass silently, and the
service failed later on a topic that did not exist.  (Tansu, the test broker, refuses nothing, so
the answer's shape is checked here as the Kafka protocol defines it: topic, error code, message.)"""
from __future__ import annotations

from shared.kafka import refused_topics


def test_a_refused_creation_is_named_and_an_existing_topic_is_none() -> None:
    assert refused_topics([("a", 0, None), ("b", 36, "Topic 'b' already exists.")]) is None
    assert refused_topics([("a", 0), ("c", 29, "Not authorized"), ("d", 38, None)]) == \
        "c (TopicAuthorizationFailedError: Not authorized), d (InvalidReplicationFactorError)"
