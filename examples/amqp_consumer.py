#!/usr/bin/env python3
"""A RabbitMQ consumer of llmproxy's usage records (pika), deduplicating by message_id.

Delivery is at least once: after a crash or a lost confirm a record can be published
twice, always with the same message_id (the record's request_id). A billing consumer
keeps the ids it has applied (here a set; in production a unique key in the billing
database) and acknowledges a duplicate without applying it again.

    examples/amqp_consumer.py --url amqp://guest:guest@127.0.0.1:5672/%2f \
        [--queue llmproxy.usage] [--expect N] [--timeout S] [--jsonl]

Prints one line per new record (the JSON record itself with --jsonl), and on exit a
summary line `consumed M messages, N distinct records, D duplicates`. With --expect it
exits once N distinct records arrived (status 0), or at --timeout (status 1).
"""
import argparse
import json
import sys
import time

import pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--queue", default="llmproxy.usage")
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=0)
    ap.add_argument("--jsonl", action="store_true")
    args = ap.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(args.url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    seen = set()
    messages = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    for method, props, body in ch.consume(args.queue, inactivity_timeout=0.2):
        if method is not None:
            messages += 1
            record = json.loads(body)
            mid = props.message_id
            # The message_id is the record's request_id: the dedupe key.
            assert mid == record["request_id"], (mid, record["request_id"])
            if mid not in seen:
                seen.add(mid)
                if args.jsonl:
                    print(json.dumps(record), flush=True)
                else:
                    print(
                        f"{record['request_id']} {record.get('model')} "
                        f"prompt={record.get('prompt_tokens')} completion={record.get('completion_tokens')} "
                        f"{record.get('outcome')}",
                        flush=True,
                    )
            ch.basic_ack(method.delivery_tag)
        if args.expect and len(seen) >= args.expect:
            break
        if deadline and time.monotonic() > deadline:
            break
    ch.cancel()
    conn.close()
    print(
        f"consumed {messages} messages, {len(seen)} distinct records, {messages - len(seen)} duplicates",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(0 if not args.expect or len(seen) >= args.expect else 1)


if __name__ == "__main__":
    main()
