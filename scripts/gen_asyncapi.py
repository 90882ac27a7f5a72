"""Generate gen/asyncapi/asyncapi.yaml and asyncapi.json (AsyncAPI 3.0) from the protos.

Called by scripts/gen.py with a FileDescriptorSet that has imports and source
info. Every message with the ``(autoecoops.common.v1.event)`` option is an
event type; the topic it names becomes a channel whose address is its Redis
stream (``autoecoops:events:<topic>``), with a dead-letter channel beside it
(``...:dlq``). Message payloads are the CloudEvents envelope
(``autoecoops.events.v1.Envelope``) with ``type`` and ``data`` narrowed to the
event type; schemas are the proto3 JSON mapping, built by the same schema
builder as the OpenAPI document, and the proto comments are their descriptions.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from autoecoops.common.v1 import options_pb2
from autoecoops.gateway.openapi import SchemaBuilder, comments_of

Schema = dict[str, Any]

ENVELOPE = "autoecoops.events.v1.Envelope"
DEAD_LETTER = "autoecoops.events.v1.DeadLetter"
STREAM_PREFIX = "autoecoops:events:"
TYPE_URL_PREFIX = "type.googleapis.com/"

INTRO = """\
The events of AutoEcoOps: one channel per topic, each a Redis stream owned by
the event bus (event-bus, port 4003, `autoecoops.events.v1.EventBusService`).

* **Publishing** goes through `Publish`/`PublishBatch`: the bus validates the
  envelope (a known type on its own topic, a payload that parses as that type,
  an idempotency key, trace context and actor), deduplicates by idempotency
  key and appends it to the topic's stream.
* **Receiving** goes through `Subscribe` with a consumer group: at-least-once
  delivery with leases, `Ack`/`Nack`, retries with exponential backoff, and a
  dead-letter channel per topic after the group's last attempt.
* **Payloads** are shown in their proto3 JSON form. In Redis each stream entry
  holds the protobuf-encoded envelope in its `e` field (its `id` empty: the
  entry id is the event id) beside `k` (idempotency key digest), `t` (type),
  `tp` (traceparent) and `a` (actor subject).
* **Addresses** use the default key prefix `autoecoops:`; a deployment that
  sets `AUTOECOOPS_KEY_PREFIX` replaces it.
"""


def _camel(topic: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in topic.replace("-", ".").split("."))


def event_types(
    pool: descriptor_pool.DescriptorPool, files: list[str]
) -> list[tuple[options_pb2.EventSpec, descriptor.Descriptor]]:
    """(event option, payload) of every event message in ``files``, in file order."""
    out = []
    for name in files:
        for desc in pool.FindFileByName(name).message_types_by_name.values():
            opts = desc.GetOptions()
            if opts.HasExtension(options_pb2.event):
                out.append((opts.Extensions[options_pb2.event], desc))
    return out


def build_document(
    pool: descriptor_pool.DescriptorPool, files: list[str], comments: dict[str, str]
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the event types declared in ``files``."""
    schemas = SchemaBuilder(comments)
    envelope_ref = schemas.ref(pool.FindMessageTypeByName(ENVELOPE))
    dead_letter_ref = schemas.ref(pool.FindMessageTypeByName(DEAD_LETTER))
    by_topic: dict[str, list[tuple[options_pb2.EventSpec, descriptor.Descriptor]]] = defaultdict(
        list
    )
    for spec, desc in event_types(pool, files):
        by_topic[spec.topic].append((spec, desc))
        schemas.ref(desc)

    messages: dict[str, Schema] = {}
    channels: dict[str, Schema] = {}
    operations: dict[str, Schema] = {}
    packed: dict[str, str] = {}
    for topic in sorted(by_topic):
        channel_messages: dict[str, Schema] = {}
        for spec, desc in by_topic[topic]:
            key = desc.name
            packed[desc.full_name] = f"{desc.full_name}.Packed"
            messages[spec.type] = {
                "name": spec.type,
                "title": desc.name,
                "summary": spec.summary,
                "description": comments.get(desc.full_name, spec.summary),
                "contentType": "application/json",
                "payload": {
                    "allOf": [envelope_ref],
                    "properties": {
                        "type": {"const": spec.type},
                        "data": {"$ref": f"#/components/schemas/{packed[desc.full_name]}"},
                    },
                },
            }
            channel_messages[key] = {"$ref": f"#/components/messages/{spec.type}"}
        types = ", ".join(f"`{s.type}`" for s, _ in by_topic[topic])
        channels[topic] = {
            "address": STREAM_PREFIX + topic,
            "title": topic,
            "description": f"The Redis stream of topic `{topic}`; its events: {types}.",
            "messages": channel_messages,
        }
        dlq = f"{topic}.deadLetters"
        channels[dlq] = {
            "address": f"{STREAM_PREFIX}{topic}:dlq",
            "title": f"{topic} dead letters",
            "description": (
                f"Events of `{topic}` that a consumer group failed to process in all its "
                "attempts (or nacked as permanent failures), each with its original envelope, "
                "the reason, the attempt count, the consumer and the time. Listed, redriven "
                "and purged with the dead-letter RPCs of EventBusService."
            ),
            "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
        }
        name = _camel(topic)
        for op_id, action, channel, summary in (
            (
                f"publish{name}",
                "send",
                topic,
                f"Publish to {topic} (EventBusService.Publish / PublishBatch).",
            ),
            (
                f"consume{name}",
                "receive",
                topic,
                f"Consume {topic} in a consumer group (EventBusService.Subscribe, Ack, Nack).",
            ),
            (
                f"deadLetter{name}",
                "send",
                dlq,
                f"The bus dead-letters an event of {topic} after a group's last attempt.",
            ),
            (
                f"inspectDeadLetters{name}",
                "receive",
                dlq,
                f"List, redrive or purge the dead letters of {topic} (EventBusService).",
            ),
        ):
            operations[op_id] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": summary,
                "messages": [
                    {"$ref": f"#/channels/{channel}/messages/{key}"}
                    for key in channels[channel]["messages"]
                ],
            }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": "An event that used all its attempts in a consumer group.",
        "description": comments.get(DEAD_LETTER, ""),
        "contentType": "application/json",
        "payload": dead_letter_ref,
    }

    components = schemas.finish()
    for full, name in packed.items():
        # The Any form of a payload: its fields plus @type naming it.
        schema = copy.deepcopy(components[full])
        schema["properties"] = {
            "@type": {"const": TYPE_URL_PREFIX + full},
            **schema.get("properties", {}),
        }
        schema["required"] = ["@type", *schema.get("required", [])]
        components[name] = schema
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "AutoEcoOps events", "version": "v1", "description": INTRO},
        "defaultContentType": "application/json",
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": (
                    "The Redis of the mesh (REDIS_URL; `autoecoops up` embeds one). Clients "
                    "reach the streams through the event bus, never directly."
                ),
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": dict(sorted(messages.items())),
            "schemas": dict(sorted(components.items())),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line descriptions as literal blocks, and no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        """Repeat shared values rather than alias them: easier to read and diff."""
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = (
        "|"
        if "\n" in value and not any(line != line.rstrip() for line in value.split("\n"))
        else None
    )
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def generate(fds_path: Path, out_dir: Path) -> None:
    """Write asyncapi.yaml and asyncapi.json for the event types in ``fds_path``."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in fds.file:
        pool.Add(file)
    ours = [f for f in fds.file if f.name.startswith("autoecoops/")]
    document = build_document(pool, [f.name for f in ours], comments_of(ours))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "asyncapi.json").write_text(
        json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "asyncapi.yaml").write_text(
        yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100),
        encoding="utf-8",
    )
