"""Event contracts: the envelope, one payload model per topic, and the topic catalogue."""
from shared.events.envelope import Envelope, decode_event, encode_event
from shared.events.topics import TOPICS, Topic, dead_letter

__all__ = ["Envelope", "TOPICS", "Topic", "dead_letter", "decode_event", "encode_event"]
