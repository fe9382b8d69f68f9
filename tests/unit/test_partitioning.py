"""shared.partitioning places every key exactly where aiokafka's DefaultPartitioner does."""
from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2 as aiokafka_murmur2

from shared.partitioning import murmur2, partition_for


def test_murmur2_matches_aiokafka_for_every_length_and_many_keys():
    rng = random.Random(7)
    keys = [b"", b"a", b"ab", b"abc", b"abcd", "ünïcode-käy".encode()]
    keys += [rng.randbytes(rng.randrange(0, 80)) for _ in range(5000)]
    for key in keys:
        assert murmur2(key) & 0x7FFFFFFF == aiokafka_murmur2(key) & 0x7FFFFFFF, key


def test_partition_for_matches_the_default_partitioner():
    rng = random.Random(11)
    partitioner = DefaultPartitioner()
    for count in (1, 3, 4, 12):
        partitions = list(range(count))
        for _ in range(500):
            key = str(rng.getrandbits(128)).encode()
            assert partition_for(key, partitions) == partitioner(key, partitions, partitions)


def test_known_kafka_values():
    # Values from Kafka's own UtilsTest.testMurmur2 (as signed 32-bit ints there).
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829, b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
             b"abc": 479470107}
    for key, signed in cases.items():
        assert murmur2(key) == signed & 0xFFFFFFFF, key
