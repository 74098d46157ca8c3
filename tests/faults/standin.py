"""A stand-in for ``jupyterhub-singleuser``, for the fault suite's CI sizes.

A real single-user server costs about four CPU-seconds to boot (its imports), which at the
CI sizes of tests/faults would be most of the suite's time on two cores. The stand-in is
standard-library Python run in the same test image as the same user, in the same container
gpuspawner made; it does what the hub and the suite's checks ask of a server: it listens
where ``JUPYTERHUB_SERVICE_URL`` says, answers the hub's readiness probe (``<prefix>api``),
and answers ``<prefix>api/status`` only to a token the hub vouches for (``GET
$JUPYTERHUB_API_URL/user`` with an ``access:servers`` scope, cached for a minute, as the real
server caches it), so a server whose hub cannot vouch for its caller does not answer 200. It
exits at once on SIGTERM. ``GPUSPAWNER_FAULTS_SERVER=jupyter`` runs the real server instead
(the full-size run does, see tests/faults/sizes.py).
"""

from __future__ import annotations

#: The server's source, run as ``python3 -c SOURCE`` in the container.
SOURCE = r'''
import os, signal
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # first: PID 1 ignores it until then
import json, sys, time, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL") or "http://0.0.0.0:8888/")
prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/"
api = (os.environ.get("JUPYTERHUB_API_URL") or "").rstrip("/")
started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
vouched = {}


def allowed(header):
    token = header[6:].strip() if header.lower().startswith("token ") else ""
    if not token:
        return False
    if vouched.get(token, 0) > time.monotonic():
        return True
    request = urllib.request.Request(api + "/user", headers={"Authorization": "token " + token})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            scopes = json.load(answer).get("scopes") or []
    except (urllib.error.URLError, OSError, ValueError):
        return False
    if any(s.startswith("access:servers") for s in scopes):
        vouched[token] = time.monotonic() + 60
        return True
    return False


class Handler(BaseHTTPRequestHandler):
    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if not path.startswith(prefix):
            return self.answer(404, {"message": "not this server"})
        rest = path[len(prefix):]
        if rest in ("api", "api/"):
            return self.answer(200, {"version": "stand-in"})
        if rest == "api/status":
            if not allowed(self.headers.get("Authorization", "")):
                return self.answer(403, {"message": "the hub does not vouch for this token"})
            return self.answer(200, {"started": started, "last_activity": started,
                                     "connections": 0, "kernels": 0})
        return self.answer(200, {"stand-in": rest})

    def log_message(self, format, *args):
        sys.stderr.write("stand-in: " + (format % args) + "\n")


ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 8888), Handler).serve_forever()
'''


def command() -> list[str]:
    return ["python3", "-c", SOURCE]
