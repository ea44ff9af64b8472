"""A billing receiver that verifies every POST with the Standard Webhooks reference
library (the `standardwebhooks` package): 200 and the record kept when the signature
holds, 401 otherwise. GET /records returns the verified records; GET /failures the
number refused.

Usage: python webhook_verify.py SECRET      (prints "listening on 127.0.0.1:PORT")
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

hook = Webhook(sys.argv[1])
records, failures = [], [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/records":
            self.answer(200, json.dumps(records).encode())
        else:
            self.answer(200, json.dumps({"failures": failures[0]}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            record = hook.verify(body, headers)
        except Exception as e:  # standardwebhooks.WebhookVerificationError
            failures[0] += 1
            self.answer(401, json.dumps({"error": str(e)}).encode())
            return
        assert headers["webhook-id"] == record["request_id"] == headers["idempotency-key"]
        records.append(record)
        self.answer(200, b'{"ok":true}')


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
