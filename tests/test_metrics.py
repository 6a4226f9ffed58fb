"""Tests of the metrics (chatlib/metrics.py): the histogram, the text
format (read back by a strict parser of the format, written here and not in
the product, so that the product cannot agree with itself by mistake),
the HTTP request parser without sockets, ``--metrics``'s value, the
endpoint on real sockets, and ``promtool check metrics`` where it is
installed."""

import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import socket
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request
from multiprocessing.connection import wait

from support import IO_TIMEOUT, SocketClient, TestCase, UnitTestCase, read_until_eof

from chatlib import metrics
from chatlib.metrics import (BROADCAST_BOUNDS, CONTENT_TYPE, Answer, Histogram,
                             HistogramState, MetricsEndpoint, RequestReader, parse_listen,
                             render, response)


# -- a strict reader of the text format (0.0.4) --------------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]Inf|NaN")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
ESCAPES = {"\\": "\\", "n": "\n", '"': '"'}


class FormatError(AssertionError):
    pass


def parse_exposition(text):
    """``{family: {"type", "help", "samples": [(name, labels, value)]}}``
    from ``text``, or FormatError saying which line breaks which rule.

    Stricter than Prometheus where the product has no reason to differ: no
    empty lines, no comments but HELP and TYPE, both before any sample of
    their family, no timestamps."""
    if not text.endswith("\n"):
        raise FormatError("the text does not end with a newline")
    families = {}
    current = None           # the family whose lines these are
    seen_series = set()
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d %r" % (number, line)
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 4 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
                raise FormatError("%s: a comment other than HELP or TYPE" % where)
            _, keyword, name, rest = parts
            if not METRIC_NAME.fullmatch(name):
                raise FormatError("%s: bad metric name" % where)
            if keyword == "HELP":
                if name in families:
                    raise FormatError("%s: family declared twice" % where)
                families[name] = {"help": unescape(rest, where, quotes=False),
                                  "type": None, "samples": []}
                current = name
            else:
                if name != current or families[name]["type"] is not None:
                    raise FormatError("%s: TYPE not right after its HELP" % where)
                if rest not in TYPES:
                    raise FormatError("%s: unknown type" % where)
                if rest == "counter" and not name.endswith("_total"):
                    raise FormatError("%s: a counter's name must end in _total" % where)
                families[name]["type"] = rest
            continue
        name, labels, value = parse_sample(line, where)
        if current is None or families[current]["type"] is None:
            raise FormatError("%s: a sample before its family's HELP and TYPE" % where)
        if name not in sample_names(current, families[current]["type"]):
            raise FormatError("%s: not a sample of family %s" % (where, current))
        series = (name, frozenset(labels.items()))
        if series in seen_series:
            raise FormatError("%s: duplicate series" % where)
        seen_series.add(series)
        families[current]["samples"].append((name, labels, value))
    for name, family in families.items():
        if family["type"] is None:
            raise FormatError("family %s has HELP but no TYPE" % name)
        if family["type"] == "histogram":
            check_histogram(name, family["samples"])
    return families


def sample_names(family, kind):
    if kind == "histogram":
        return {family + "_bucket", family + "_sum", family + "_count"}
    return {family}


def parse_sample(line, where):
    match = METRIC_NAME.match(line)
    if match is None:
        raise FormatError("%s: no metric name" % where)
    name, pos, labels = match.group(), match.end(), {}
    if line.startswith("{", pos):
        pos += 1
        while not line.startswith("}", pos):
            if labels:
                if not line.startswith(",", pos):
                    raise FormatError("%s: labels not separated by a comma" % where)
                pos += 1
            key = LABEL_NAME.match(line, pos)
            if key is None or not line.startswith('="', key.end()):
                raise FormatError("%s: bad label at %d" % (where, pos))
            if key.group() in labels or key.group().startswith("__"):
                raise FormatError("%s: label %s repeated or reserved" % (where, key.group()))
            pos = key.end() + 2
            raw = []
            while True:
                if pos >= len(line):
                    raise FormatError("%s: unterminated label value" % where)
                char = line[pos]
                if char == '"':
                    break
                if char == "\\":
                    raw.append(line[pos:pos + 2])
                    pos += 2
                else:
                    raw.append(char)
                    pos += 1
            labels[key.group()] = unescape("".join(raw), where, quotes=True)
            pos += 1
        pos += 1
    if not line.startswith(" ", pos) or not VALUE.fullmatch(line[pos + 1:]):
        raise FormatError("%s: not NAME[{LABELS}] VALUE" % where)
    return name, labels, float(line[pos + 1:])


def unescape(text, where, quotes):
    out, chars = [], iter(text)
    for char in chars:
        if char == "\n" or (quotes and char == '"'):
            raise FormatError("%s: an unescaped %r" % (where, char))
        if char == "\\":
            escaped = next(chars, "")
            if escaped not in ESCAPES or (escaped == '"' and not quotes):
                raise FormatError("%s: bad escape \\%s" % (where, escaped))
            char = ESCAPES[escaped]
        out.append(char)
    return "".join(out)


def check_histogram(name, samples):
    buckets = [(labels, value) for sample, labels, value in samples if sample == name + "_bucket"]
    counts = [value for sample, _, value in samples if sample == name + "_count"]
    sums = [value for sample, _, value in samples if sample == name + "_sum"]
    if len(counts) != 1 or len(sums) != 1:
        raise FormatError("%s: not one _count and one _sum" % name)
    if not buckets or any(set(labels) != {"le"} for labels, _ in buckets):
        raise FormatError("%s: buckets without le, or none" % name)
    bounds = [float(labels["le"]) for labels, _ in buckets]
    values = [value for _, value in buckets]
    if bounds != sorted(set(bounds)) or bounds[-1] != math.inf:
        raise FormatError("%s: bucket bounds not increasing to +Inf: %s" % (name, bounds))
    if values != sorted(values):
        raise FormatError("%s: buckets not cumulative: %s" % (name, values))
    if values[-1] != counts[0]:
        raise FormatError("%s: the +Inf bucket %s is not _count %s" % (name, values[-1],
                                                                     counts[0]))


def values_of(families, family):
    """``{label values: value}`` of ``family``'s samples."""
    return {tuple(labels.values()): value for _, labels, value in families[family]["samples"]}


# -- snapshots -----------------------------------------------------------------

def broadcast_state(*seconds):
    histogram = Histogram(BROADCAST_BOUNDS)
    for value in seconds:
        histogram.observe(value)
    return histogram.state()


def full_snapshot():
    return {
        "connections": 12, "users": 10, "accepted": 345,
        "refused": {"server-full": 1, "too-many-connections": 2, "banned": 3},
        "logins": {"ok": 300, "username-taken": 4, "invalid-username": 5, "banned": 0,
                   "unavailable": 0},
        "messages": 7000, "deliveries": 70000, "bytes_in": 2 ** 40, "bytes_out": 10 ** 18,
        "disconnects": {"quit": 200, "closed": 90, "idle-timeout": 3, "login-timeout": 1,
                        "slow-consumer": 2, "flood": 1, "kicked": 0, "banned": 0,
                        "error": 4, "shutdown": 0, "unavailable": 0,
                        'odd "reason"\\\n': 1},
        "restarts": {"acceptor": 0, "worker": 2, "broker": 1},
        "tls_handshakes": {"ok": 40, "failed": 3},
        "cluster": {"redis_up": 1, "nodes": 3, "entries_in": 5000, "entries_out": 2500},
        "broadcast_seconds": broadcast_state(0.0001, 0.0005, 0.003, 0.2, 3.0),
        "uptime_seconds": 3600.25,
        "workers": 4,
    }


def minimal_snapshot():
    snapshot = full_snapshot()
    snapshot.update(tls_handshakes=None, refused={}, broadcast_seconds=broadcast_state())
    del snapshot["cluster"]
    return snapshot


# -- unit tests -----------------------------------------------------------------

class HistogramTest(UnitTestCase):

    def test_an_observation_goes_in_the_first_bucket_it_fits(self):
        histogram = Histogram((0.1, 1, 10))
        for seconds in (0.05, 0.1, 0.10001, 1, 9.9, 10, 11, 1e9):
            histogram.observe(seconds)
        state = histogram.state()
        self.assertEqual(state.counts, (2, 2, 2, 2))      # le is "at most": 0.1 in the first
        self.assertEqual(state.count, 8)
        self.assertAlmostEqual(state.sum, 0.05 + 0.1 + 0.10001 + 1 + 9.9 + 10 + 11 + 1e9)

    def test_a_state_is_a_small_picklable_tuple(self):
        state = broadcast_state(0.001, 0.3)
        self.assertIsInstance(state, tuple)
        self.assertEqual(pickle.loads(pickle.dumps(state)), state)
        counts, total, count = state
        self.assertEqual(len(counts), len(BROADCAST_BOUNDS) + 1)
        self.assertEqual((total, count), (0.301, 2))

    def test_a_state_does_not_move_with_later_observations(self):
        histogram = Histogram()
        state = histogram.state()
        histogram.observe(0.01)
        self.assertEqual(state.count, 0)

    def test_merge_sums_the_states_of_several_processes(self):
        merged = Histogram.merge([broadcast_state(0.0001, 5), None,
                                  tuple(broadcast_state(0.0001, 0.02)), broadcast_state()])
        self.assertEqual(merged.count, 4)
        self.assertAlmostEqual(merged.sum, 5.0202)
        self.assertEqual(merged.counts[0], 2)
        self.assertEqual(merged.counts[-1], 1)
        self.assertEqual(sum(merged.counts), 4)

    def test_merge_of_nothing_is_an_empty_state(self):
        self.assertEqual(Histogram.merge([]), Histogram().state())

    def test_merge_refuses_states_of_other_bounds(self):
        with self.assertRaises(ValueError):
            Histogram.merge([Histogram((1, 2)).state()])

    def test_bounds_must_increase(self):
        for bounds in ((), (1, 1), (2, 1), (1, math.inf)):
            with self.assertRaises(ValueError, msg=bounds):
                Histogram(bounds)

    def test_the_default_bounds(self):
        self.assertEqual(Histogram().bounds, (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                              0.05, 0.1, 0.25, 0.5, 1, 2.5))


class StrictParserTest(UnitTestCase):
    """The parser that checks the product rejects what it must: otherwise
    the render tests would pass whatever render wrote."""

    GOOD = ("# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n"
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n"
            "h_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n")

    def test_the_good_text_parses(self):
        families = parse_exposition(self.GOOD)
        self.assertEqual(values_of(families, "a_total"), {("1",): 2.0})

    def test_broken_texts_are_rejected(self):
        for broken in (
                self.GOOD[:-1],                                             # no final newline
                self.GOOD.replace("# TYPE a_total counter\n", ""),         # no TYPE
                self.GOOD.replace("# HELP a_total A.\n", ""),              # no HELP
                self.GOOD.replace("a_total counter", "a_total gauge\n# TYPE a_total counter"),
                self.GOOD.replace("a_total", "a"),                         # counter without _total
                self.GOOD.replace('{x="1"}', '{x="1",x="2"}'),             # repeated label
                self.GOOD.replace('{x="1"}', '{x="1"'),                    # unterminated
                self.GOOD.replace('{x="1"}', '{x=1}'),                     # unquoted
                self.GOOD.replace('{x="1"}', '{x="\\t"}'),                 # bad escape
                self.GOOD.replace('{x="1"}', '{1x="1"}'),                  # bad label name
                self.GOOD.replace(" 2\n", " 2 123\n", 1),                  # a timestamp
                self.GOOD.replace(" 2\n", " 0x2\n", 1),                    # not a float
                self.GOOD.replace(" 2\n", " inf\n", 1),                    # not Prometheus's Inf
                self.GOOD + 'a_total{x="1"} 3\n',                          # a family resumed
                self.GOOD.replace("h_sum", 'a_total{x="2"} 1\nh_sum'),     # in another family
                self.GOOD.replace("h_count 2", "h_count 3"),               # +Inf is not count
                self.GOOD.replace('le="1"} 1', 'le="1"} 3'),               # not cumulative
                self.GOOD.replace('h_bucket{le="+Inf"} 2\n', ""),          # no +Inf
                self.GOOD.replace("h_sum 3.5\n", ""),                      # no _sum
                self.GOOD + "\n",                                          # an empty line
                self.GOOD.replace("\nh_sum", "\n# a comment\nh_sum"),
                self.GOOD.replace("A.", "A\\x"),                           # bad HELP escape
        ):
            with self.assertRaises(FormatError, msg=broken):
                parse_exposition(broken)

    def test_a_duplicate_series_is_rejected(self):
        with self.assertRaisesRegex(FormatError, "duplicate"):
            parse_exposition(self.GOOD.replace('a_total{x="1"} 2\n',
                                               'a_total{x="1"} 2\na_total{x="1"} 3\n'))


class RenderTest(UnitTestCase):

    EVERY_FAMILY = [
        ("chat_connections", "gauge"), ("chat_users", "gauge"),
        ("chat_connections_accepted_total", "counter"),
        ("chat_connections_refused_total", "counter"), ("chat_logins_total", "counter"),
        ("chat_messages_received_total", "counter"), ("chat_lines_delivered_total", "counter"),
        ("chat_received_bytes_total", "counter"), ("chat_sent_bytes_total", "counter"),
        ("chat_disconnections_total", "counter"), ("chat_process_restarts_total", "counter"),
        ("chat_tls_handshakes_total", "counter"), ("chat_cluster_redis_up", "gauge"),
        ("chat_cluster_nodes", "gauge"), ("chat_cluster_bus_entries_received_total", "counter"),
        ("chat_cluster_bus_entries_sent_total", "counter"),
        ("chat_broadcast_duration_seconds", "histogram"), ("chat_uptime_seconds", "gauge"),
        ("chat_workers", "gauge"),
    ]

    def test_a_full_snapshot_gives_every_family_in_order(self):
        families = parse_exposition(render(full_snapshot()))
        self.assertEqual([(name, f["type"]) for name, f in families.items()],
                         self.EVERY_FAMILY)
        self.assertTrue(all(f["help"] for f in families.values()))

    def test_every_figure_where_it_belongs(self):
        families = parse_exposition(render(full_snapshot()))
        single = {name: values_of(families, name)[()] for name in families
                  if name != "chat_broadcast_duration_seconds"
                  and values_of(families, name).keys() == {()}}
        self.assertEqual(single, {
            "chat_connections": 12, "chat_users": 10, "chat_connections_accepted_total": 345,
            "chat_messages_received_total": 7000, "chat_lines_delivered_total": 70000,
            "chat_received_bytes_total": 2 ** 40, "chat_sent_bytes_total": 10 ** 18,
            "chat_cluster_redis_up": 1, "chat_cluster_nodes": 3,
            "chat_cluster_bus_entries_received_total": 5000,
            "chat_cluster_bus_entries_sent_total": 2500, "chat_uptime_seconds": 3600.25,
            "chat_workers": 4})
        self.assertEqual(values_of(families, "chat_connections_refused_total"),
                         {("server-full",): 1, ("too-many-connections",): 2, ("banned",): 3})
        self.assertEqual(values_of(families, "chat_tls_handshakes_total"),
                         {("ok",): 40, ("failed",): 3})
        self.assertEqual(values_of(families, "chat_process_restarts_total"),
                         {("acceptor",): 0, ("worker",): 2, ("broker",): 1})
        self.assertEqual(values_of(families, "chat_logins_total")[("username-taken",)], 4)

    def test_series_come_in_the_dicts_order_with_their_label_name(self):
        families = parse_exposition(render(full_snapshot()))
        reasons = [labels for _, labels, _ in families["chat_disconnections_total"]["samples"]]
        self.assertEqual(reasons, [{"reason": key} for key in full_snapshot()["disconnects"]])
        self.assertEqual(values_of(families, "chat_disconnections_total")[
            ('odd "reason"\\\n',)], 1)      # escaped, and read back the same

    def test_the_histogram_is_cumulative_with_the_bounds_as_le(self):
        text = render(full_snapshot())
        families = parse_exposition(text)
        samples = families["chat_broadcast_duration_seconds"]["samples"]
        buckets = [(labels["le"], value) for name, labels, value in samples
                   if name.endswith("_bucket")]
        self.assertEqual(buckets[:4], [("0.0005", 2), ("0.001", 2), ("0.0025", 2),
                                       ("0.005", 3)])
        self.assertEqual(buckets[-3:], [("1", 4), ("2.5", 4), ("+Inf", 5)])
        self.assertEqual(len(buckets), len(BROADCAST_BOUNDS) + 1)
        self.assertIn("chat_broadcast_duration_seconds_count 5\n", text)
        self.assertIn("chat_broadcast_duration_seconds_sum %r\n"
                      % (0.0001 + 0.0005 + 0.003 + 0.2 + 3.0), text)

    def test_a_minimal_snapshot_leaves_out_tls_and_cluster(self):
        text = render(minimal_snapshot())
        families = parse_exposition(text)
        left_out = {"chat_tls_handshakes_total", "chat_cluster_redis_up", "chat_cluster_nodes",
                    "chat_cluster_bus_entries_received_total",
                    "chat_cluster_bus_entries_sent_total",
                    "chat_connections_refused_total"}      # an empty dict: no series
        self.assertEqual(list(families), [name for name, _ in self.EVERY_FAMILY
                                          if name not in left_out])
        self.assertNotIn("tls", text)
        self.assertNotIn("cluster", text)
        self.assertIn('chat_broadcast_duration_seconds_bucket{le="+Inf"} 0\n', text)

    def test_the_text_is_exactly_the_format(self):
        text = render({"connections": 3, "disconnects": {"quit": 1},
                       "broadcast_seconds": HistogramState((0,) * 12 + (1,), 3.0, 1),
                       "uptime_seconds": 1.5})
        expected = (
            "# HELP chat_connections Open client connections on this node.\n"
            "# TYPE chat_connections gauge\n"
            "chat_connections 3\n"
            "# HELP chat_disconnections_total Client connections closed, by reason.\n"
            "# TYPE chat_disconnections_total counter\n"
            'chat_disconnections_total{reason="quit"} 1\n'
            "# HELP chat_broadcast_duration_seconds Time from the sender's worker reading "
            "a MSG to the last local recipient's write.\n"
            "# TYPE chat_broadcast_duration_seconds histogram\n"
            + "".join('chat_broadcast_duration_seconds_bucket{le="%s"} 0\n' % le
                      for le in ("0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
                                 "0.05", "0.1", "0.25", "0.5", "1", "2.5"))
            + 'chat_broadcast_duration_seconds_bucket{le="+Inf"} 1\n'
            "chat_broadcast_duration_seconds_sum 3.0\n"
            "chat_broadcast_duration_seconds_count 1\n"
            "# HELP chat_uptime_seconds Seconds since the server started.\n"
            "# TYPE chat_uptime_seconds gauge\n"
            "chat_uptime_seconds 1.5\n")
        self.assertEqual(text, expected)

    def test_numbers_as_prometheus_reads_them(self):
        for value, text in ((0, "0"), (10 ** 20, "100000000000000000000"), (True, "1"),
                            (0.1, "0.1"), (2.0, "2.0"), (1e-7, "1e-07"), (math.inf, "+Inf"),
                            (-math.inf, "-Inf"), (math.nan, "NaN")):
            self.assertEqual(metrics.format_value(value), text)

    def test_label_values_are_escaped(self):
        self.assertEqual(metrics.escape_label_value('a\\b"c\nd'), 'a\\\\b\\"c\\nd')

    def test_every_row_of_the_table_follows_the_conventions(self):
        for family in metrics.FAMILIES:
            self.assertTrue(family.name.startswith("chat_"), family.name)
            self.assertEqual(family.name.endswith("_total"), family.type == "counter",
                             family.name)
            self.assertEqual(family.bounds is not None, family.type == "histogram")


class RequestReaderTest(UnitTestCase):

    def answer(self, data, pieces=1):
        """The answer to ``data`` fed in pieces of ``len(data) // pieces``
        bytes (at least one); None if there is none."""
        reader = RequestReader()
        size = max(1, len(data) // pieces)
        answers = [reader.receive_data(data[i:i + size]) for i in range(0, len(data), size)]
        given = [a for a in answers if a is not None]
        self.assertLessEqual(len(given), 1)
        return given[0] if given else None

    def test_get_metrics(self):
        for request in (b"GET /metrics HTTP/1.1\r\nHost: localhost:9464\r\n"
                        b"User-Agent: Prometheus/2.42\r\nAccept: */*\r\n\r\n",
                        b"GET /metrics HTTP/1.0\r\n\r\n",
                        b"GET /metrics?name[]=chat_users HTTP/1.0\r\n\r\n",
                        b"GET http://example.org:9464/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /metrics HTTP/1.0\n\n",
                        b"GET /metrics HTTP/1.0\r\nX-Empty:\r\nX-Tab:\tv \r\n\r\n"):
            self.assertEqual(self.answer(request), Answer(200), request)

    def test_head_metrics(self):
        self.assertEqual(self.answer(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
                         Answer(200, head_only=True))

    def test_another_path_is_not_found(self):
        for path in (b"/", b"/metrics/", b"/Metrics", b"/metricsx", b"/other?/metrics",
                     b"http://x/"):
            self.assertEqual(self.answer(b"GET %s HTTP/1.0\r\n\r\n" % path), Answer(404), path)
        self.assertEqual(self.answer(b"HEAD /other HTTP/1.0\r\n\r\n"), Answer(404, True))

    def test_another_method_is_not_allowed(self):
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get"):
            self.assertEqual(self.answer(b"%s /metrics HTTP/1.0\r\n\r\n" % method),
                             Answer(405), method)

    def test_a_malformed_request_is_bad(self):
        for request in (b"GET /metrics\r\n\r\n",                        # HTTP/0.9
                        b"GET /metrics HTTP/2.0\r\n\r\n",
                        b"GET /metrics HTTP/1.1\r\n\r\n",               # 1.1 without Host
                        b"GET  /metrics HTTP/1.0\r\n\r\n",
                        b"GET /metrics HTTP/1.0 \r\n\r\n",
                        b"GET /me trics HTTP/1.0\r\n\r\n",
                        b"GET metrics HTTP/1.0\r\n\r\n",
                        b"GET /metrics\x00 HTTP/1.0\r\n\r\n",
                        b"G(T /metrics HTTP/1.0\r\n\r\n",
                        b"GET /metrics HTTP/1.0\r\nNo colon\r\n\r\n",
                        b"GET /metrics HTTP/1.0\r\nSpace : before\r\n\r\n",
                        b"GET /metrics HTTP/1.0\r\nA: b\r\n folded\r\n\r\n",
                        b"GET /metrics HTTP/1.0\r\nA: b\rc\r\n\r\n",
                        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",   # TLS
                        b"\r\n\r\n",
                        b"\n\n"):
            self.assertEqual(self.answer(request).status, 400, request)

    def test_a_head_over_8_kib_is_too_large(self):
        line = b"GET /metrics HTTP/1.0\r\n"
        filler = b"X-Filler: " + b"a" * (8192 - len(line) - 10 - 4) + b"\r\n"
        self.assertEqual(len(line + filler + b"\r\n"), 8192)
        self.assertEqual(self.answer(line + filler + b"\r\n"), Answer(200))   # 8 KiB: fine
        too_long = line + b"X-Filler: a" + filler[10:] + b"\r\n"
        self.assertEqual(self.answer(too_long), Answer(431))
        reader = RequestReader()          # no end in sight: answered as soon as it is over
        self.assertIsNone(reader.receive_data(line + b"X: " + b"a" * (8192 - len(line) - 3)))
        self.assertEqual(reader.receive_data(b"a"), Answer(431))

    def test_byte_by_byte_is_the_same_as_at_once(self):
        for request in (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /metrics HTTP/1.0\n\n", b"GET /metrics HTTP/1.0\r\n\n",
                        b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
                        b"GET /x HTTP/1.0\r\n\r\n", b"nonsense\n\r\n"):
            at_once = self.answer(request)
            self.assertIsNotNone(at_once, request)
            for pieces in (len(request), 7, 3):
                self.assertEqual(self.answer(request, pieces), at_once, (request, pieces))

    def test_nothing_until_the_head_has_ended(self):
        reader = RequestReader()
        for piece in (b"GET /metrics HTTP/1.1\r\n", b"Host: x\r\n", b"\r"):
            self.assertIsNone(reader.receive_data(piece))
        self.assertEqual(reader.receive_data(b"\n"), Answer(200))

    def test_the_first_answer_is_the_only_one(self):
        reader = RequestReader()
        self.assertEqual(reader.receive_data(b"GET /x HTTP/1.0\r\n\r\nGET /metrics HTTP/1.0"
                                             b"\r\n\r\n"), Answer(404))
        self.assertIsNone(reader.receive_data(b"GET /metrics HTTP/1.0\r\n\r\n"))


class ResponseTest(UnitTestCase):

    def head_and_body(self, data):
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        return lines[0], dict(line.split(": ", 1) for line in lines[1:]), body

    def test_the_metrics(self):
        status, headers, body = self.head_and_body(
            response(Answer(200), "chat_users 1\n", "Sun, 06 Nov 1994 08:49:37 GMT"))
        self.assertEqual(status, "HTTP/1.1 200 OK")
        self.assertEqual(headers, {"Date": "Sun, 06 Nov 1994 08:49:37 GMT",
                                   "Content-Type": CONTENT_TYPE, "Content-Length": "13",
                                   "Connection": "close"})
        self.assertEqual(body, b"chat_users 1\n")
        self.assertEqual(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")

    def test_head_has_the_length_of_the_body_it_leaves_out(self):
        status, headers, body = self.head_and_body(response(Answer(200, True), "é\n"))
        self.assertEqual((headers["Content-Length"], body), ("3", b""))
        self.assertNotIn("Date", headers)

    def test_errors_have_a_short_plain_body(self):
        for status, reason in ((400, "Bad Request"), (404, "Not Found"),
                               (405, "Method Not Allowed"),
                               (431, "Request Header Fields Too Large")):
            line, headers, body = self.head_and_body(response(Answer(status)))
            self.assertEqual(line, "HTTP/1.1 %d %s" % (status, reason))
            self.assertEqual(body, b"%d %s\n" % (status, reason.encode()))
            self.assertEqual(headers["Content-Length"], str(len(body)))
            self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")
            self.assertEqual(headers["Connection"], "close")
            self.assertEqual(headers.get("Allow"), "GET, HEAD" if status == 405 else None)


class ParseListenTest(UnitTestCase):

    def test_accepted(self):
        for text, expected in (("9464", ("127.0.0.1", 9464)),
                               ("0", ("127.0.0.1", 0)),
                               ("0.0.0.0:9464", ("0.0.0.0", 9464)),
                               ("localhost:65535", ("localhost", 65535)),
                               ("metrics.example.org:80", ("metrics.example.org", 80)),
                               ("[::1]:9464", ("::1", 9464)),
                               ("[::]:9464", ("::", 9464)),
                               ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1))):
            self.assertEqual(parse_listen(text), expected, text)
        self.assertEqual(parse_listen("9464", default_host="::1"), ("::1", 9464))

    def test_refused_with_a_reason(self):
        for text, reason in (("", "port"), ("http", "port"), ("65536", "port"),
                             ("-1", "port"), ("+80", "port"), (" 80", "port"),
                             ("١٢٣", "port"), ("host:", "port"), ("host:80x", "port"),
                             (":9464", "no host"), ("::1:9464", "brackets"),
                             ("::1", "brackets"), ("[::1]", r"\[ADDRESS\]:PORT"),
                             ("[::1]9464", r"\[ADDRESS\]:PORT"),
                             ("[example.org]:80", "not an IPv6"),
                             ("[1.2.3.4]:80", "not an IPv6"),
                             ("a b:80", "not a host"), ("a]:80", "not a host")):
            with self.assertRaisesRegex(ValueError, reason, msg=text):
                parse_listen(text)


# -- the endpoint on real sockets ----------------------------------------------

class Loop:
    """The caller's loop, in a thread, as the supervisor runs it: wait
    (shorter while writing), on_ready, flush, tick."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.stopping = threading.Event()
        self.failure = None
        self.writing_seen = threading.Event()
        self.thread = threading.Thread(target=self.run, name="metrics-loop", daemon=True)

    def run(self):
        endpoint = self.endpoint
        try:
            while not self.stopping.is_set():
                if endpoint.writing:
                    self.writing_seen.set()
                ours = endpoint.waitables()
                for obj in wait(ours, 0.002 if endpoint.writing else 0.05):
                    endpoint.on_ready(obj)
                endpoint.flush()
                endpoint.tick(time.monotonic())
        except BaseException as exc:       # reported by stop(), in the test's thread
            self.failure = exc
        finally:
            endpoint.close()

    def stop(self):
        self.stopping.set()
        self.thread.join(IO_TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError("the endpoint's loop did not stop")
        if self.failure is not None:
            raise AssertionError("the endpoint's loop failed") from self.failure


class EndpointTest(TestCase):

    def endpoint(self, render_now=None, **options):
        """An open endpoint on 127.0.0.1 (a port of its own), run by a
        :class:`Loop` stopped when the test ends; its port."""
        endpoint = MetricsEndpoint("127.0.0.1", 0,
                                   render_now or (lambda: render(full_snapshot())),
                                   metrics_log(), **options)
        endpoint.open()
        loop = Loop(endpoint)
        loop.thread.start()
        self.addCleanup(loop.stop)
        self.loop = loop
        host, port = endpoint.address
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        return port

    def raw(self, port):
        """A plain socket client, closed when the test ends."""
        client = SocketClient(socket.create_connection(("127.0.0.1", port),
                                                       timeout=IO_TIMEOUT))
        self.addCleanup(client.close)
        return client

    def exchange(self, port, request):
        client = self.raw(port)
        client.sock.sendall(request)
        return read_until_eof(client, reset_ok=False)

    def test_get_metrics_with_urllib(self):
        port = self.endpoint()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics?x=1" % port,
                                    timeout=IO_TIMEOUT) as reply:
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.headers["Content-Type"], CONTENT_TYPE)
            body = reply.read()
        families = parse_exposition(body.decode("utf-8"))
        self.assertEqual(values_of(families, "chat_workers"), {(): 4})

    def test_head_metrics(self):
        port = self.endpoint()
        request = urllib.request.Request("http://127.0.0.1:%d/metrics" % port, method="HEAD")
        with urllib.request.urlopen(request, timeout=IO_TIMEOUT) as reply:
            self.assertEqual(reply.status, 200)
            self.assertEqual(int(reply.headers["Content-Length"]),
                             len(render(full_snapshot()).encode()))
            self.assertEqual(reply.read(), b"")

    def test_not_found_and_not_allowed(self):
        port = self.endpoint()
        reply = self.exchange(port, b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 404 Not Found\r\n"), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\n404 Not Found\n"), reply)
        reply = self.exchange(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 5\r\n\r\nhello")
        self.assertTrue(reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), reply)
        self.assertIn(b"\r\nAllow: GET, HEAD\r\n", reply)

    def test_a_head_too_large_is_answered_while_it_is_still_coming(self):
        port = self.endpoint()
        client = self.raw(port)
        client.sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
        reply = read_until_eof(client, reset_ok=False)
        self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply)

    def test_a_request_byte_by_byte(self):
        port = self.endpoint()
        client = self.raw(port)
        for byte in b"GET /metrics HTTP/1.0\r\n\r\n":
            client.sock.send(bytes([byte]))
            time.sleep(0.001)
        reply = read_until_eof(client, reset_ok=False)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:100])

    def test_a_client_that_sends_nothing_is_closed_after_the_timeout(self):
        timeout = 0.3
        port = self.endpoint(timeout=timeout)
        client = self.raw(port)
        started = time.monotonic()
        self.assertEqual(read_until_eof(client), b"")
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, timeout * 0.8)
        self.assertLess(elapsed, timeout + 2.0)

    def test_connections_over_the_limit_are_closed_at_once(self):
        port = self.endpoint(max_connections=2, timeout=60)   # not closed by the timeout
        silent = [self.raw(port) for _ in range(2)]
        for client in silent:               # both accepted, and kept
            client.sock.settimeout(0.2)
            with self.assertRaises(socket.timeout):
                client.sock.recv(1)
        self.assertEqual(read_until_eof(self.raw(port), timeout=2.0), b"")

    def test_a_client_that_never_reads_does_not_stop_another(self):
        big = "# HELP chat_x X.\n# TYPE chat_x gauge\n" + "".join(
            "chat_x{n=\"%d\"} %d\n" % (n, n) for n in range(800000))     # ~20 MB
        self.assertGreater(len(big), 16 << 20)     # more than loopback buffers hold
        port = self.endpoint(lambda: big)
        stalled = self.raw(port)
        stalled.sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        self.assertTrue(self.loop.writing_seen.wait(IO_TIMEOUT))
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                    timeout=IO_TIMEOUT) as reply:
            self.assertEqual(len(reply.read()), len(big))
        self.assertEqual(self.exchange(port, b"GET /x HTTP/1.0\r\n\r\n")[:12], b"HTTP/1.1 404")

    def test_a_failing_render_is_a_500_and_the_endpoint_goes_on(self):
        calls = []

        def render_now():
            calls.append(None)
            if len(calls) == 1:
                raise KeyError("workers")
            return "chat_ok 1\n"
        port = self.endpoint(render_now)
        with self.assertLogs("metrics-test", "ERROR"):
            with self.assertRaises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=IO_TIMEOUT)
        caught.exception.close()
        self.assertEqual(caught.exception.code, 500)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                    timeout=IO_TIMEOUT) as reply:
            self.assertEqual(reply.read(), b"chat_ok 1\n")

    @unittest.skipUnless("fork" in multiprocessing.get_all_start_methods(), "no fork here")
    def test_a_forked_child_holds_none_of_its_sockets(self):
        """The supervisor forks children: none may keep the metrics port,
        nor a scrape's connection open after the supervisor closed it."""
        endpoint = MetricsEndpoint("127.0.0.1", 0, str, metrics_log())
        endpoint.open()
        self.addCleanup(endpoint.close)
        self.raw(endpoint.address[1])
        for obj in wait(endpoint.waitables(), IO_TIMEOUT):
            endpoint.on_ready(obj)
        sockets = endpoint.waitables()
        self.assertEqual(len(sockets), 2)           # the listener, the one accepted
        descriptors = [(sock.fileno(), os.fstat(sock.fileno()).st_ino) for sock in sockets]
        ctx = multiprocessing.get_context("fork")
        reports, report = ctx.Pipe(duplex=False)
        child = ctx.Process(target=report_held, args=(descriptors, report))
        child.start()
        report.close()
        self.assertTrue(reports.poll(IO_TIMEOUT))
        self.assertEqual(reports.recv(), [False, False])
        child.join(IO_TIMEOUT)
        reports.close()

    def test_a_port_in_use_raises_oserror(self):
        port = self.endpoint()
        other = MetricsEndpoint("127.0.0.1", port, str, metrics_log())
        with self.assertRaises(OSError):
            other.open()
        other.close()


def metrics_log():
    return logging.getLogger("metrics-test")


def report_held(descriptors, report):
    """In a forked child: for each ``(fd, inode)``, whether this process
    still holds that socket."""
    held = []
    for fd, inode in descriptors:
        try:
            held.append(os.fstat(fd).st_ino == inode)
        except OSError:
            held.append(False)
    report.send(held)
    report.close()


# -- promtool --------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")


@unittest.skipIf(PROMTOOL is None, "promtool not on PATH (Debian and Ubuntu: apt-get "
                                   "install prometheus; or a release from prometheus.io)")
class PromtoolTest(TestCase):
    """Prometheus's own linter on the text: the reference, where installed."""

    def check(self, text):
        result = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace"))
        self.assertEqual(result.stdout.strip(), b"")

    def test_a_full_snapshot(self):
        self.check(render(full_snapshot()))

    def test_a_minimal_snapshot(self):
        self.check(render(minimal_snapshot()))

    def test_promtool_is_not_lenient(self):
        with self.assertRaises(AssertionError):
            self.check("# HELP chat_x X.\n# TYPE chat_x counter\nchat_x 1\n")


if __name__ == "__main__":
    unittest.main()
