"""A tracer provider for `choreo run` processes in tests: `CHOREO_TRACING=tests.trace_export:setup`.

Each finished span is written as one JSON line to the file `$CHOREO_TEST_SPANS` (opened
for appending, so several processes share one file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


def span_record(span: ReadableSpan) -> dict[str, object]:
    """What the tests look at of a span."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
    }


class FileExporter(SpanExporter):
    """Appends each span as a JSON line to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for span in spans:
                f.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


def setup() -> None:
    """Set the global tracer provider, exporting to `$CHOREO_TEST_SPANS`."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter(os.environ["CHOREO_TEST_SPANS"])))
    trace.set_tracer_provider(provider)
