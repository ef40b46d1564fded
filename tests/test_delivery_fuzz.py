"""Hostile records on the real broker: bytes a well-behaved client would never write still each
land in exactly one output topic, and the filter neither crashes nor stalls on them."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.errors import CorruptRecordError

from depois_stream.contract import headers as H
from depois_stream.contract.wire import encode_batch
from depois_stream.filter.clients.base import Unreadable
from tests.helpers.kafka_io import Topics, committed, filter_until_committed


class _RawKey(str):
    """A header name that reaches the wire as arbitrary bytes (Kafka brokers do not check that
    header names are UTF-8; kafka-python's encoder calls ``.encode("utf-8")`` on it)."""

    def __new__(cls, raw: bytes) -> "_RawKey":
        self = super().__new__(cls, raw.decode("latin-1"))
        self.raw = raw
        return self

    def encode(self, *args, **kwargs) -> bytes:  # noqa: D102 - what the producer writes
        return self.raw


def _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays, own_batches: bool):
    """Publish 40 samples, two of them with a header name that is not UTF-8 (each in a record
    batch of its own, as a separate producer's would be, or inside one batch with the rest),
    filter them and return (ids, hostile offsets, the output topics' records)."""
    _, _, xte, yte = digits_arrays
    n = 40
    ids = [f"{unique}-{i}" for i in range(n)]
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=1000)
    futures, hostile = [], {3, 17}
    try:
        for i, (sid, (value, ctype)) in enumerate(zip(ids, encode_batch(ids, xte[:n], yte[:n], encoding="binary"))):
            hdrs = [(H.CONTENT_TYPE, ctype.encode())]
            if i in hostile:
                if own_batches:
                    producer.flush()
                hdrs.append((_RawKey(b"trace-\xff\xfe\xc3"), b"x"))
            futures.append(producer.send(topics.ingest, value=value, key=sid.encode(), headers=hdrs))
            if i in hostile and own_batches:
                producer.flush()
        producer.flush()
        tail = [f"{unique}-t{i}" for i in range(10)]  # a later batch: never touched by the bad one
        for sid, (value, ctype) in zip(tail, encode_batch(tail, xte[n:n + 10], yte[n:n + 10], encoding="binary")):
            futures.append(producer.send(topics.ingest, value=value, key=sid.encode(),
                                         headers=[(H.CONTENT_TYPE, ctype.encode())]))
        producer.flush()
    finally:
        producer.close()
    end = max(f.get(timeout=10).offset for f in futures) + 1

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model, {0: end})
    sources = Counter(H.as_dict(r.headers)[H.SOURCE_OFFSET] for rs in outputs.values() for r in rs)
    assert len(sources) == n + 10 and set(sources.values()) == {1}  # each input exactly once
    assert committed(broker.bootstrap, unique, topics.ingest) == {0: end}
    dead = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]): r for r in outputs[topics.dlq]}
    for r in dead.values():
        assert H.as_dict(r.headers)[H.ERROR_CLASS] == "malformed"
        assert not any(k.startswith("trace-") for k, _ in r.headers)  # the unreadable header is not forwarded
    return ids, hostile, dead


def test_header_names_that_are_not_utf8_do_not_stall_the_partition(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    ids, hostile, dead = _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays,
                                      own_batches=True)
    assert set(dead) == hostile  # only they: the records around them are scored as usual
    if kafka_client == "confluent-kafka":  # reads the record's key and value, not just its offset
        assert all(dead[o].key == ids[o].encode() for o in hostile)


def test_a_record_kafka_python_cannot_parse_inside_a_batch_costs_only_that_batch(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """kafka-python parses a record batch from its start, so it cannot reach the records after
    an unparseable one: those are dead-lettered too (their bytes stay in the topic), and the
    partition goes on. confluent-kafka reads record by record and loses none of them."""
    ids, hostile, dead = _run_hostile(kafka_client, broker, unique, centroid_model, digits_arrays,
                                      own_batches=False)
    if kafka_client == "confluent-kafka":
        assert set(dead) == hostile
    else:  # the rest of the shared batch at most, never the later batch (offsets 40 to 49)
        assert hostile <= set(dead) and min(dead) == min(hostile) and max(dead) < 40


def test_legal_but_unusual_records_are_each_routed_once_and_forwarded_intact(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """Null header values, repeated or empty header names, a thousand headers, binary keys and
    header values, empty and absent values: all legal in Kafka, all written here with
    librdkafka (kafka-python's producer refuses null header values)."""
    from confluent_kafka import Producer

    _, _, xte, yte = digits_arrays
    ids = [f"{unique}-{i}" for i in range(8)]
    enc = encode_batch(ids, xte[:8], yte[:8], encoding="binary")
    ct = (H.CONTENT_TYPE, enc[0][1].encode())
    cases = [  # (key, value, headers, expected error class or None when scored)
        (b"k0", enc[0][0], [ct, ("x", None)], None),
        (b"k1", enc[1][0], [ct, (H.CONTENT_TYPE, b"text/csv")], None),  # the first content type counts
        (b"k2", enc[2][0], [("", b"v"), ct], None),
        (b"k3", enc[3][0], [ct] + [(f"h{j}", b"v" * 10) for j in range(1000)], None),
        (bytes(range(256)), enc[4][0], [ct], None),
        (b"k5", enc[5][0], [ct, ("\u00e9\u4e2d\U0001F600", b"\xff\x00")], None),
        (b"k6", b"", [ct], "malformed"),
        (None, None, [ct], "malformed"),
        (b"k8", enc[6][0], [(H.CONTENT_TYPE, None)], "malformed"),  # null type: the JSON default
    ]
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    acks = []
    for key, value, hdrs, _ in cases:
        producer.produce(topics.ingest, key=key, value=value, headers=hdrs,
                         on_delivery=lambda err, msg: acks.append((err, msg.offset())))
    producer.flush(10)
    assert [err for err, _ in acks] == [None] * len(cases)
    end = max(offset for _, offset in acks) + 1

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model, {0: end})
    by_offset = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]): r for rs in outputs.values() for r in rs}
    assert sorted(by_offset) == list(range(len(cases)))
    assert sum(len(rs) for rs in outputs.values()) == len(cases)
    for offset, (key, value, hdrs, error) in enumerate(cases):
        out = by_offset[offset]
        assert H.as_dict(out.headers).get(H.ERROR_CLASS) == error, offset
        if error is None:
            assert out.key == key and out.value == value  # forwarded byte for byte
            own = [(k, v) for k, v in out.headers if not k.startswith(H.PREFIX)]
            assert own == [(k, b"" if v is None else v) for k, v in hdrs]  # null values as empty


def test_every_compression_codec_a_producer_may_use_is_read(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """Producers pick their own compression (gzip, snappy, lz4, zstd are all standard Kafka);
    a client that cannot decompress one fails that fetch at every poll, a stalled partition."""
    from confluent_kafka import Producer

    _, _, xte, yte = digits_arrays
    codecs = ("none", "gzip", "snappy", "lz4", "zstd")
    per = 10
    ids = [f"{unique}-{i}" for i in range(per * len(codecs))]
    enc = encode_batch(ids, xte[:len(ids)], yte[:len(ids)], encoding="binary")
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    acks = []
    for c, codec in enumerate(codecs):
        producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "compression.type": codec,
                             "linger.ms": 100})
        for sid, (value, ctype) in list(zip(ids, enc))[c * per:(c + 1) * per]:
            producer.produce(topics.ingest, key=sid.encode(), value=value, headers=[(H.CONTENT_TYPE, ctype.encode())],
                             on_delivery=lambda err, msg: acks.append((err, msg.offset())))
        producer.flush(10)
    assert [err for err, _ in acks] == [None] * len(ids)
    end = max(offset for _, offset in acks) + 1

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model, {0: end})
    assert outputs[topics.dlq] == []
    assert sorted(r.key.decode() for rs in outputs.values() for r in rs) == sorted(ids)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("committed_at", [None, 15])
def test_a_record_batch_that_does_not_decompress_is_dead_lettered_and_passed(
        kafka_client, broker, unique, centroid_model, digits_arrays, monkeypatch, committed_at):
    """A producer batch whose compressed bytes are garbage behind a valid CRC: brokers that do
    not decompress batches to validate them (Tansu among them) store it. (A codec id no client
    knows is refused by Tansu on produce, so it is not tested here; kafka-python raises it from
    the same parser, which the adapter handles alike.)

    Before: kafka-python raised once and then looped inside its poll forever (the whole
    member hung: no heartbeat, no other partition); librdkafka fetched the batch again and
    again (the partition stalled, a warning per fetch). Now each offset of the batch is
    dead-lettered as malformed, without bytes, and the batches around it are filtered.
    A group that committed inside the batch (a member died half-way through it) resumes there:
    the offsets below the commit are not dead-lettered twice, though librdkafka reports the batch
    at its first offset."""
    import kafka.record.default_records as records

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    ids = [f"{unique}-{i}" for i in range(30)]
    enc = encode_batch(ids, xte[:30], yte[:30], encoding="binary")
    acks = []
    for part in range(3):  # three producer batches: good, garbage, good
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                 compression_type="gzip", linger_ms=100)
        if part == 1:  # gzip's magic, then zeros; the CRC is computed over them, so valid
            monkeypatch.setattr(records, "gzip_encode", lambda data: b"\x1f\x8b" + bytes(len(data) // 4))
        futures = [producer.send(topics.ingest, value=value, key=sid.encode(),
                                 headers=[(H.CONTENT_TYPE, ctype.encode())])
                   for sid, (value, ctype) in list(zip(ids, enc))[part * 10:(part + 1) * 10]]
        producer.flush()
        acks += [f.get(timeout=10).offset for f in futures]
        producer.close()
        monkeypatch.undo()
    assert acks == list(range(30))
    start = committed_at or 0
    if committed_at is not None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        earlier = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=unique, enable_auto_commit=False)
        earlier.commit({TopicPartition(topics.ingest, 0): OffsetAndMetadata(committed_at, "", -1)})
        earlier.close()

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model, {0: 30})
    sources = Counter(int(H.as_dict(r.headers)[H.SOURCE_OFFSET]) for rs in outputs.values() for r in rs)
    assert sorted(sources) == list(range(start, 30)) and set(sources.values()) == {1}
    dead = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]): r for r in outputs[topics.dlq]}
    assert set(dead) == set(range(max(10, start), 20))
    assert all(H.as_dict(r.headers)[H.ERROR_CLASS] == "malformed" for r in dead.values())
    forwarded = [r.key.decode() for t in (topics.clean, topics.quarantine) for r in outputs[t]]
    assert sorted(forwarded) == sorted(ids[start:10] + ids[20:])


def _varint(n: int) -> bytes:
    """Kafka's zigzag varint (record fields of the v2 format)."""
    n = ((n << 1) ^ (n >> 63)) & ((1 << 64) - 1)
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def _record(delta: int, key: bytes, value: bytes, ctype: bytes, length_off: int = 0,
            key_length: int | None = None) -> bytes:
    """One v2 record, its length prefix off by ``length_off`` or its key length a lie."""
    body = (b"\0" + _varint(0) + _varint(delta)
            + _varint(len(key) if key_length is None else key_length) + key
            + _varint(len(value)) + value
            + _varint(1) + _varint(len(H.CONTENT_TYPE)) + H.CONTENT_TYPE.encode()
            + _varint(len(ctype)) + ctype)
    return _varint(len(body) + length_off) + body


def _v2_batch(records: list[bytes]) -> bytes:
    """A v2 record batch around ``records``, with a valid CRC (what a broker checks, if it
    checks anything)."""
    import struct

    from kafka.record.util import calc_crc32c

    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", 0, len(records) - 1, now, now, -1, -1, -1,
                            len(records)) + b"".join(records)
    return (struct.pack(">qiib", 0, 9 + len(after_crc), -1, 2)
            + struct.pack(">I", calc_crc32c(after_crc)) + after_crc)


# What each lie leaves readable. librdkafka steps from record to record by their length
# prefixes: a key length that lies costs that record only; a record length that lies throws every
# later record of the batch out of step (too long: the lying record itself still reads).
# kafka-python cannot reach past the first record it fails on, whatever the lie.
_LIES = {  # lie -> (the record's fields, offsets of the 6-record batch librdkafka cannot read)
    "record length short": (dict(length_off=-5), {1, 2, 3, 4, 5}),
    "record length long": (dict(length_off=5), {2, 3, 4, 5}),
    "key length past the end": (dict(key_length=10_000), {1}),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lie, where", [(lie, "second record") for lie in _LIES]
                         + [("key length past the end", "first record after a marker"),
                            ("key length past the end", "first record of the partition")])
def test_a_record_no_client_can_parse_inside_an_uncompressed_batch_does_not_stall_it(
        kafka_client, broker, unique, centroid_model, digits_arrays, monkeypatch, lie, where):
    """An uncompressed record batch of 6 with a valid CRC whose second record (or, after a
    committed transaction and its marker, or as the partition's very first record, its first)
    lies about its length or its key's: Apache Kafka validates records on produce and refuses
    it, Tansu stores it.

    Before: librdkafka parsed the batch up to the lie, handed on what came before it, and then
    said nothing at all: no error, no record, the same fetch again and again. The partition
    stalled for good, the later batch too, and the stall watch's restart at the same offset
    changed nothing (an outside fuzz drill, stop 51). Now every offset lands in exactly one
    output topic, the group commits to the end, and only what the client cannot read is
    dead-lettered: a first fix also dead-lettered the records librdkafka reads past a key
    length that lies (a diff review), and left a lying batch after a transaction marker
    stalled, and one at the start of a partition no group had committed (a fuzz drill).
    kafka-python raises on these records itself and dead-letters the rest of the batch."""
    import kafka.record.memory_records as memory_records

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    n = 16
    ids = [f"{unique}-{i}" for i in range(n)]
    enc = encode_batch(ids, xte[:n], yte[:n], encoding="binary")
    fields, unread = _LIES[lie]
    after_marker = where == "first record after a marker"
    bad = 1 if where == "second record" else 0
    start = 0
    if after_marker:  # offsets 0 to 2, the commit marker at 3
        tx = KafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id=f"{unique}-tx")
        tx.init_transactions()
        tx.begin_transaction()
        for i in range(3):
            tx.send(topics.ingest, key=ids[i].encode(), value=enc[i][0], partition=0,
                    headers=[(H.CONTENT_TYPE, enc[i][1].encode())])
        tx.commit_transaction()
        tx.close()
        start = 4
    unread = {start + o - 1 + bad for o in unread}  # _LIES counts from a lie at index 1
    raw = _v2_batch([_record(i, ids[start + i].encode(), enc[start + i][0], enc[start + i][1].encode(),
                             **(fields if i == bad else {})) for i in range(6)])
    close = memory_records.MemoryRecordsBuilder.close

    def close_with_raw(self):  # the producer's batch becomes the hand-made one
        close(self)
        self._buffer = raw

    # not idempotent: the hand-made batch carries no producer id, so no sequence to check
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0,
                             enable_idempotence=False)
    try:
        monkeypatch.setattr(memory_records.MemoryRecordsBuilder, "close", close_with_raw)
        first = producer.send(topics.ingest, key=b"ignored", value=b"ignored", partition=0).get(timeout=10)
        monkeypatch.undo()
        acks = [producer.send(topics.ingest, key=sid.encode(), value=value, partition=0,
                              headers=[(H.CONTENT_TYPE, ctype.encode())]).get(timeout=10).offset
                for sid, (value, ctype) in zip(ids[start + 6:], enc[start + 6:])]
    finally:
        producer.close()
    assert (first.offset, acks[0]) == (start, start + 6)
    end = acks[-1] + 1

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model,
                                     {0: end}, timeout_s=90, stall_restart_s=1.0, lag_interval_s=0.5)
    sources = Counter(int(H.as_dict(r.headers)[H.SOURCE_OFFSET]) for rs in outputs.values() for r in rs)
    records = sorted(set(range(end)) - ({3} if after_marker else set()))
    assert sorted(sources) == records and set(sources.values()) == {1}
    dead = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]) for r in outputs[topics.dlq]}
    if kafka_client == "confluent-kafka":
        assert dead == unread, lie
    else:
        assert dead == set(range(start + bad, start + 6)), lie


def test_the_second_opinion_finds_nothing_where_records_read(broker, unique, digits_arrays) -> None:
    """kafka-python's second opinion on a partition whose records it reads, or with nothing
    to read: nothing unreadable, so the stall watch only restarts it (never dead-letters)."""
    from depois_stream.filter.clients.base import ClientSettings
    from depois_stream.filter.clients.kafka_python import second_opinion

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    value, ctype = encode_batch([unique], xte[:1], yte[:1], encoding="binary")[0]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    producer.send(topics.ingest, value=value, headers=[(H.CONTENT_TYPE, ctype.encode())]).get(timeout=10)
    producer.close()
    settings = ClientSettings(bootstrap_servers=broker.bootstrap, client_id=unique)
    started = time.monotonic()
    assert len(second_opinion(settings, (topics.ingest, 0), 0, timeout_s=5.0)) == 0
    assert time.monotonic() - started < 4.0  # it reads the record: no need to wait it out
    started = time.monotonic()
    assert len(second_opinion(settings, (topics.ingest, 0), 1, timeout_s=5.0)) == 0  # the end
    assert time.monotonic() - started < 4.0  # two empty answers: not waited out (a diff review)


def test_a_random_mix_of_records_over_three_partitions_is_each_routed_once(
        kafka_client, broker, unique, centroid_model, digits_arrays):
    """Seeded fuzz: valid samples, truncated and bit-flipped ones, random bytes, random header
    names, values and counts, every codec, three partitions. Whatever each record is, it comes
    out exactly once, and every offset is committed.

    The codecs take turns (one producer flushed before the next writes): Tansu, given
    concurrent appends to one partition from several connections, can report a log start
    offset past records it acknowledged (seen: 18 of partition 2 in one run of 15), so a new group
    would start there. Apache Kafka's log start is the first retained record."""
    import random

    from confluent_kafka import Producer

    rng = random.Random(20261204)
    _, _, xte, yte = digits_arrays
    n = 300
    ids = [f"{unique}-{i}" for i in range(n)]
    enc = encode_batch(ids, xte[:n], yte[:n], encoding="binary")
    topics = Topics.create(broker.bootstrap, unique, partitions=3)
    producers = {c: Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "compression.type": c,
                              "linger.ms": 5}) for c in ("none", "gzip", "snappy", "lz4", "zstd")}
    acks: list = []
    producer, left = None, 0
    for i, (value, ctype) in enumerate(enc):
        if left == 0:  # the next run of records, from another codec's producer
            if producer is not None:
                producer.flush(10)
            producer, left = producers[rng.choice(list(producers))], rng.randrange(1, 40)
        left -= 1
        kind = rng.random()
        if kind < 0.1:
            value = value[:rng.randrange(len(value))]  # truncated
        elif kind < 0.2:
            b = bytearray(value)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)  # one bit flipped anywhere
            value = bytes(b)
        elif kind < 0.25:
            value = rng.randbytes(rng.randrange(0, 200))
        hdrs = [(H.CONTENT_TYPE, ctype.encode())] if rng.random() < 0.9 else []
        for _ in range(rng.randrange(4)):
            name = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x2FFF)]))
                           for _ in range(rng.randrange(0, 12)))
            hdrs.insert(rng.randrange(len(hdrs) + 1), (name, rng.choice([None, b"", rng.randbytes(8)])))
        producer.produce(topics.ingest, key=rng.choice([ids[i].encode(), None]), value=value, headers=hdrs,
                         partition=rng.randrange(3), on_delivery=lambda err, msg: acks.append(
                             (err, msg.partition(), msg.offset())))
    producer.flush(10)
    assert [a[0] for a in acks] == [None] * n
    ends = {p: max(o for _, q, o in acks if q == p) + 1 for p in range(3)}

    outputs = filter_until_committed(kafka_client, broker, topics, unique, centroid_model, ends, timeout_s=90)
    sources = Counter((int(H.as_dict(r.headers)[H.SOURCE_PARTITION]), int(H.as_dict(r.headers)[H.SOURCE_OFFSET]))
                      for rs in outputs.values() for r in rs)
    assert sources == Counter((q, o) for _, q, o in acks)  # each input exactly once
    assert len(outputs[topics.clean]) + len(outputs[topics.quarantine]) > n // 2


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_kafka_python_decompresses_a_record_batch_only_up_to_the_bound(codec, monkeypatch) -> None:
    """kafka-python decompressed a whole record batch in memory, however large: a zstd batch of
    a few tens of kB on the wire (1,000 records of 1 MiB of zeros) took the filter to 2.1 GiB,
    past the shipped 1 GiB memory limit (fuzz drill). The bounded decoders refuse to go past
    MAX_BATCH_BYTES and give back what fits, byte for byte."""
    from kafka import codec as kc

    import depois_stream.filter.clients.kafka_python_parsing as kp

    monkeypatch.setattr(kp, "MAX_BATCH_BYTES", 1 << 20)
    encode = {"gzip": kc.gzip_encode, "snappy": kc.snappy_encode, "lz4": kc.lz4_encode,
              "zstd": kc.zstd_encode}[codec]
    decode = kp.BOUNDED_DECODERS[codec]
    fits = bytes(range(256)) * 4096  # exactly the bound
    assert bytes(decode(encode(fits))) == fits
    with pytest.raises(kp.BatchTooLarge, match="decompresses past 1048576 bytes"):
        decode(encode(fits + b"x"))
    if codec == "snappy":  # raw snappy (no xerial framing) is bounded by its length prefix
        import snappy

        assert bytes(decode(snappy.compress(fits))) == fits
        with pytest.raises(kp.BatchTooLarge):
            decode(snappy.compress(fits + b"x"))
        xerial = encode(b"abc")
        with pytest.raises(ValueError):  # a negative block size: kafka-python looped for ever
            decode(xerial[:16] + (-8).to_bytes(4, "big", signed=True) + xerial[20:])


@pytest.mark.timeout(120)
def test_a_compression_bomb_costs_kafka_python_one_bounded_batch(broker, unique, centroid_model,
                                                                 digits_arrays):
    """One zstd batch of 72 records of 1 MiB of zeros (about 2 kB on the wire) between good
    batches. Before: kafka-python unpacked all 72 MiB, and the records reached the data path
    (1,000 of them took the filter past 2 GiB). Now the batch is refused at the bound, its
    offsets are dead-lettered as malformed (stamped with no timestamp: kafka-python cannot read
    one), and the batches around it are filtered."""
    import depois_stream.filter.clients.kafka_python_parsing as kp

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    good = [f"{unique}-{i}" for i in range(20)]
    enc = encode_batch(good, xte[:20], yte[:20], encoding="binary")
    bomb = kp.MAX_BATCH_BYTES // (1 << 20) + 8
    offsets: list[int] = []
    for part in range(3):
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", compression_type="zstd",
                                 linger_ms=1000, batch_size=(bomb + 2) << 20, max_request_size=(bomb + 4) << 20)
        if part == 1:
            futures = [producer.send(topics.ingest, key=b"bomb", value=bytes(1 << 20)) for _ in range(bomb)]
        else:
            futures = [producer.send(topics.ingest, value=value, key=sid.encode(),
                                     headers=[(H.CONTENT_TYPE, ctype.encode())])
                       for sid, (value, ctype) in list(zip(good, enc))[part // 2 * 10:(part // 2 + 1) * 10]]
        producer.flush()
        offsets += [f.get(timeout=30).offset for f in futures]
        producer.close()
    end = bomb + 20
    assert offsets == list(range(end))

    outputs = filter_until_committed("kafka-python", broker, topics, unique, centroid_model, {0: end})
    sources = Counter(int(H.as_dict(r.headers)[H.SOURCE_OFFSET]) for rs in outputs.values() for r in rs)
    assert sorted(sources) == list(range(end)) and set(sources.values()) == {1}
    dead = {int(H.as_dict(r.headers)[H.SOURCE_OFFSET]): H.as_dict(r.headers) for r in outputs[topics.dlq]}
    assert set(dead) == set(range(10, 10 + bomb))
    assert {h[H.ERROR_CLASS] for h in dead.values()} == {"malformed"}
    assert all("decompresses past" in h[H.ERROR] for h in dead.values()), next(iter(dead.values()))
    assert {h[H.SOURCE_TIMESTAMP] for h in dead.values()} == {"-1"}  # unknown, not made up
    forwarded = [r.key.decode() for t in (topics.clean, topics.quarantine) for r in outputs[t]]
    assert sorted(forwarded) == sorted(good)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("carrier", ["value", "header"])
def test_one_kafka_python_poll_holds_a_bounded_number_of_bytes(carrier, broker, unique, monkeypatch) -> None:
    """The decompression bound is per record batch; many small batches of one large record
    each (25 zstd batches of 20 MiB of zeros are 18 kB on the wire) still added up within one
    poll of --batch-size records: a reviewer measured +465 MiB in one kafka-python poll, and
    512 such records would have been 10 GiB. A poll now stops taking records once it holds
    MAX_HELD_BYTES (the rest stay in the fetch for the next poll: nothing skipped, nothing
    read twice). Scaled down here: 12 records of 2 MiB against a 5 MiB bound."""
    import depois_stream.filter.clients.base as base
    from depois_stream.filter.clients.base import ClientSettings
    from depois_stream.filter.clients.kafka_python import KafkaPythonConsumer

    monkeypatch.setattr(base, "MAX_HELD_BYTES", 5 << 20, raising=False)
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", compression_type="zstd",
                             linger_ms=0, max_request_size=4 << 20)
    for i in range(12):  # one batch each: flushed one at a time
        big = bytes([i]) * (2 << 20)  # a header is inside the compressed batch too
        producer.send(topics.ingest, key=str(i).encode(), value=big if carrier == "value" else b"",
                      headers=[] if carrier == "value" else [("h", big)]).get(timeout=30)
    producer.close()

    consumer = KafkaPythonConsumer(ClientSettings(bootstrap_servers=broker.bootstrap,
                                                  client_id=unique, group_id=unique), lambda e: None)
    consumer.subscribe(topics.ingest, lambda tps: {}, lambda tps: None, lambda tps: None)
    polls: list[list[int]] = []
    seen: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(seen) < 12 and time.monotonic() < deadline:
            got = consumer.poll(1.0, 512)
            if len(got):
                polls.append([len(v) + sum(len(x) for _, x in h) for v, h in zip(got.values, got.headers)])
                seen += got.offsets.tolist()
                big = [v if carrier == "value" else h[0][1] for v, h in zip(got.values, got.headers)]
                assert all(b == bytes([k]) * (2 << 20) for k, b in zip(got.offsets.tolist(), big))
    finally:
        consumer.close()
    assert seen == list(range(12)), seen  # in order, none skipped, none twice
    import gc

    from depois_stream.filter.clients.kafka_python_parsing import _PollFull
    # a poll's end must not leave its frames (and records) in a reference cycle: that kept
    # 80 MiB per poll alive until the next full collection
    assert not [o for o in gc.get_objects() if isinstance(o, _PollFull)]
    assert max(sum(p) for p in polls) <= (5 << 20) + (2 << 20), polls  # the bound, plus one record
    assert len(polls) >= 4, polls  # 3 records (6 MiB) a poll at most


@pytest.mark.timeout(120)
def test_a_batch_in_hand_holds_a_bounded_number_of_bytes(broker, unique, centroid_model,
                                                         monkeypatch) -> None:
    """The linger window gathered polls until --batch-size records, whatever their size, so 25
    records of 20 MiB (18 kB of zstd on the wire) became one 500 MiB batch (peak RSS 673 MiB).
    A batch now stops growing once it holds MAX_HELD_BYTES, and a kafka-python poll stops
    taking records there too; every record is still dead-lettered (too large to forward) and
    committed once. Scaled down: 12 records of 2 MiB against a 5 MiB bound. Not
    confluent-kafka: librdkafka decompresses what it prefetches, so the bytes are spent inside
    it before a poll could refuse them (docs/wire-format.md)."""
    kafka_client = "kafka-python"
    import threading

    import depois_stream.filter.clients.base as base
    from depois_stream.filter import pipeline
    from depois_stream.filter.app import StreamFilter
    from depois_stream.filter.metrics import Metrics
    from tests.helpers.kafka_io import consumer_config, read_all, wait_for

    monkeypatch.setattr(base, "MAX_HELD_BYTES", 5 << 20, raising=False)
    held: list[int] = []
    score = pipeline.score

    def spy(batch, *args, **kwargs):
        held.append(sum(len(v) for v in batch.values if v))
        return score(batch, *args, **kwargs)

    monkeypatch.setattr(pipeline, "score", spy)
    topics = Topics.create(broker.bootstrap, unique, partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", compression_type="zstd",
                             linger_ms=0, max_request_size=4 << 20)
    for i in range(12):  # one batch each
        producer.send(topics.ingest, key=str(i).encode(), value=bytes(2 << 20)).get(timeout=30)
    producer.close()
    flt = StreamFilter(consumer_config(broker.bootstrap, topics, unique, centroid_model, client=kafka_client,
                                       batch_size=512, linger_ms=2000, exit_when_idle_s=None), Metrics())
    stop = threading.Event()
    runner = threading.Thread(target=flt.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: committed(broker.bootstrap, unique, topics.ingest) == {0: 12}, timeout_s=60)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive()
    dead = sorted(int(H.as_dict(r.headers)[H.SOURCE_OFFSET]) for r in read_all(broker.bootstrap, topics.dlq))
    assert dead == list(range(12))
    assert max(held) <= 2 * (5 << 20) + (2 << 20), held  # the batch's bound, one poll's, one record
    assert len([h for h in held if h]) >= 2, held


def test_stuck_at_names_the_first_offset_kafka_python_cannot_hand_over() -> None:
    from depois_stream.filter.clients.kafka_python_parsing import _stuck_at

    err = ValueError("bad header")
    assert _stuck_at(7, 7, err)[0] == 7 and "cannot read this record" in _stuck_at(7, 7, err)[1]
    assert _stuck_at(3, 9, err) == (9, "kafka-python cannot read past offset 3 of the same record batch "
                                       "(ValueError: bad header)")  # batch re-read from its start
    assert _stuck_at(12, 9, err)[0] == 12  # transaction markers skipped before the bad record


def _columns(batch) -> tuple[list[int], list[int], list]:
    return batch.partitions.tolist(), batch.offsets.tolist(), list(batch.headers)


def _subscribed(kafka_client: str, broker, group: str, topic: str, **options):
    """The filter's consumer adapter for ``kafka_client``, alone, subscribed to ``topic``; and
    the set its assignments accumulate in."""
    from depois_stream.filter.clients import make_client
    from depois_stream.filter.clients.base import ClientSettings

    consumer = make_client(kafka_client).consumer(
        ClientSettings(bootstrap_servers=broker.bootstrap, client_id=group, group_id=group,
                       options=options), lambda err: None)
    assigned: set = set()
    consumer.subscribe(topic, lambda tps: assigned.update(tps) or {}, lambda tps: None, lambda tps: None)
    return consumer, assigned


@pytest.mark.timeout(120)
def test_kafka_python_error_held_for_the_next_poll_survives_a_pause(broker, unique, digits_arrays):
    """kafka-python keeps a parse error met after other partitions' records for the next poll,
    and drops it if that partition is paused in between (the breaker or a backoff does that);
    every poll after the resume then spins on the stuck fetch. The adapter handles the error in
    the poll that met it, so pausing and resuming after every poll loses and stalls nothing
    (the pauses go on after the recovery: the spent parser must not be parked for good)."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    ids = [f"{unique}-{i}" for i in range(60)]
    enc = encode_batch(ids, xte[:60], yte[:60], encoding="binary")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for i, (value, ctype) in enumerate(enc[:50]):  # partition 0: fifty good records
        producer.send(topics.ingest, value=value, key=ids[i].encode(), partition=0,
                      headers=[(H.CONTENT_TYPE, ctype.encode())])
    producer.flush()
    for i, (value, ctype) in enumerate(enc[50:], start=50):  # partition 1: a hostile one first
        hdrs = [(H.CONTENT_TYPE, ctype.encode())] + ([(_RawKey(b"\xff"), b"x")] if i == 50 else [])
        producer.send(topics.ingest, value=value, key=ids[i].encode(), partition=1, headers=hdrs)
        producer.flush()
    producer.close()

    consumer, assigned = _subscribed("kafka-python", broker, unique, topics.ingest)
    seen: dict[tuple[int, int], object] = {}
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 60:
            assert time.monotonic() < deadline, sorted(seen)
            got = _columns(consumer.poll(0.5, 512))
            for p, o, h in zip(*got):
                assert (p, o) not in seen
                seen[(p, o)] = h
            if (topics.ingest, 1) in assigned:
                consumer.pause([(topics.ingest, 1)])  # as the breaker would, then lifted
                seen.update({(p, o): h for p, o, h in zip(*_columns(consumer.poll(0.0, 512)))})
                consumer.resume([(topics.ingest, 1)])
    finally:
        consumer.close()
    assert isinstance(seen[(1, 0)], Unreadable)
    assert not any(isinstance(h, Unreadable) for (p, o), h in seen.items() if (p, o) != (1, 0))


@pytest.mark.timeout(120)
def test_a_partition_paused_with_records_left_in_hand_is_read_on_after_resume(
        kafka_client, broker, unique, digits_arrays):
    """Pause a partition while the client still holds records of its last fetch, read another
    partition to its end, resume: every record of the paused partition still arrives.

    kafka-python 3.0.12 parks the held records at the pause and restores them only when its
    in-hand slot is empty (``is None``), but leaves the other partition's spent records there:
    the parked partition is then never handed over nor fetched again, a silent stall of one
    partition. The filter pauses for the breaker and for producer backoffs, and a rebalance
    during such a pause resumes a subset of partitions exactly like this."""
    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=2)
    n0, n1 = 400, 20
    ids = [f"{unique}-{i}" for i in range(n0 + n1)]
    enc = encode_batch(ids, xte[:n0 + n1], yte[:n0 + n1], encoding="binary")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=50)
    for i, (value, ctype) in enumerate(enc):
        producer.send(topics.ingest, value=value, key=ids[i].encode(), partition=int(i >= n0),
                      headers=[(H.CONTENT_TYPE, ctype.encode())])
    producer.close()

    consumer, _ = _subscribed(kafka_client, broker, unique, topics.ingest)
    p0 = (topics.ingest, 0)
    seen: set = set()

    def take(max_records: int) -> None:
        for p, o, _ in zip(*_columns(consumer.poll(0.5, max_records))):
            assert (p, o) not in seen
            seen.add((p, o))

    try:
        deadline = time.monotonic() + 60
        while not any(p == 0 for p, _ in seen):  # some of partition 0, far from all of it
            assert time.monotonic() < deadline
            take(50)
        assert sum(p == 0 for p, _ in seen) < n0
        consumer.pause([p0])
        consumer.seek(p0, 1 + max(o for p, o in seen if p == 0))  # as the filter rewinds a paused batch
        while sum(p == 1 for p, _ in seen) < n1:  # partition 1 to its end while 0 is paused
            assert time.monotonic() < deadline
            take(50)
        take(50)
        consumer.resume([p0])
        while len(seen) < n0 + n1:
            assert time.monotonic() < deadline, f"partition 0 stalled at {sum(p == 0 for p, _ in seen)} of {n0}"
            take(50)
    finally:
        consumer.close()
    assert seen == {(int(i >= n0), i - n0 * int(i >= n0)) for i in range(n0 + n1)}


@pytest.mark.timeout(180)
def test_partitions_resumed_while_others_have_a_backlog_are_fetched_again(broker, unique, digits_arrays):
    """Two partitions are paused, each while kafka-python holds fetched records of it, and
    resumed while two others have a backlog: neither may stay parked after the resume.

    kafka-python 3.0.12 parks the records it holds for a partition that gets paused and does
    not fetch that partition while they are parked. It gives them back one partition at a
    time, and only into an empty in-hand slot, which a backlog keeps full at the start of
    every poll: the second parked partition starved for as long as the backlog lasted. Two
    parked partitions come from a rebalance during the breaker's or a backoff's pause (a
    partition newly assigned, read in the poll that assigned it, then paused). kafka-python
    only, and white-box on purpose: which partition is in hand is the client's internal
    state, and Tansu's fetch sizes make any timing of the starvation a matter of luck."""
    from kafka import TopicPartition

    _, _, xte, yte = digits_arrays
    topics = Topics.create(broker.bootstrap, unique, partitions=4)
    sizes = {0: 1000, 1: 1000, 2: 6000, 3: 6000}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20)
    for p, n in sizes.items():
        enc = encode_batch([f"{p}-{i}" for i in range(n)], xte[np.arange(n) % len(xte)],
                           yte[np.arange(n) % len(yte)], encoding="binary")
        for value, ctype in enc:
            producer.send(topics.ingest, value=value, partition=p, headers=[(H.CONTENT_TYPE, ctype.encode())])
    producer.close()

    # small fetches: the in-hand slot changes partition often
    consumer, _ = _subscribed("kafka-python", broker, unique, topics.ingest,
                              max_partition_fetch_bytes=16 << 10)
    parked = consumer._c._fetcher._paused_partition_records
    got: dict[int, set[int]] = {p: set() for p in sizes}

    def take() -> list[int]:
        parts, offsets, _ = _columns(consumer.poll(0.5, 50))
        for p, o in zip(parts, offsets):
            assert o not in got[p]
            got[p].add(o)
        return parts

    try:
        deadline = time.monotonic() + 90
        paused: list[int] = []
        while len(paused) < 2:  # pause a small partition right after a poll that ended inside it
            assert time.monotonic() < deadline, f"could not park both small partitions: {paused}"
            parts = take()
            last = parts[-1] if parts else None
            if last in (0, 1) and last not in paused and len(got[last]) < sizes[last]:
                consumer.pause([(topics.ingest, last)])
                take()
                if TopicPartition(topics.ingest, last) in parked:
                    paused.append(last)
                else:  # its records were not in hand after all: try again
                    consumer.resume([(topics.ingest, last)])
        consumer.resume([(topics.ingest, 0), (topics.ingest, 1)])
        take()
        assert not parked, f"resumed partitions still parked (so not fetched): {sorted(parked)}"
        while any(len(got[p]) < sizes[p] for p in (0, 1)):
            assert time.monotonic() < deadline, {p: len(got[p]) for p in sizes}
            take()
    finally:
        consumer.close()
    assert all(got[p] == set(range(sizes[p])) for p in (0, 1))


def test_a_record_without_a_timestamp_is_stamped_unknown_not_a_crash() -> None:
    """kafka-python gives a v0 record's timestamp as None: the int64 column raised TypeError
    outside any handler, and the filter exited 3 and re-read the same record at every restart
    (review of stop 47)."""
    from kafka.consumer.fetcher import ConsumerRecord

    from depois_stream.filter.clients.kafka_python import KafkaPythonConsumer

    rec = ConsumerRecord("t", 0, -1, 5, None, -1, b"k", b"v", [], None, 1, 1, -1)

    class _Polled:
        def poll(self, timeout_ms: int, max_records: int) -> dict:
            return {("t", 0): [rec]}

    consumer = object.__new__(KafkaPythonConsumer)
    consumer._topic, consumer._c = "t", _Polled()
    batch = consumer.poll(0.1, 10)
    assert batch.offsets.tolist() == [5] and batch.timestamps_ms.tolist() == [-1]


def test_the_rest_of_an_unreadable_batch_is_skipped_only_when_its_header_can_be_believed() -> None:
    """The CRC covers a batch's last offset delta: after a CRC failure it is garbage. Believed,
    a delta of 500 over 5 records dead-lettered the readable batches after it, unread, and
    sought past the log's end (review of stop 47)."""
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    from depois_stream.filter.clients.kafka_python_parsing import _batch_end

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=100000)
    for i in range(5):
        builder.append(i, timestamp=1, key=b"k", value=b"v",
                       headers=[(_RawKey(b"x\xff"), b"")] if i == 2 else [])
    good = bytes(builder.build())
    forged = good[:23] + (500).to_bytes(4, "big") + good[27:]  # lastOffsetDelta, under the CRC

    class _Partition:  # plays kafka-python's PartitionRecords._unpack_records
        def __init__(self, check_crcs: bool) -> None:
            self.check_crcs = check_crcs

        def _unpack_records(self, batch):
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError("Record batch failed crc check")
            yield from batch

    def end(data: bytes, check_crcs: bool = True):
        try:
            list(_Partition(check_crcs)._unpack_records(DefaultRecordBatch(data)))
        except Exception as exc:  # noqa: BLE001 - whatever the parser raised
            return _batch_end(exc)
        raise AssertionError("the batch parsed")

    assert end(good) == 5  # a bad header name in a sound batch: the rest of it goes too
    assert end(forged) is None  # a CRC failure: nothing past the record itself
    assert end(good, check_crcs=False) is None  # never checked: not believed either
