"""Resources for schemathesis to work on: the `{id}` routes and the ids in request bodies get
real ones (see schemathesis.toml beside this file), so that generated requests reach the API's
logic instead of answering 404 or 422 for an unknown id.

Usage: fixtures.py BASE_URL ADMIN_KEY JWT_SECRET OUT  -> writes OUT: schemathesis.toml (the operations'
bindings) followed by the dictionaries of the ids made here, with the admin JWT in it.
Creates, through the API itself: models (one restricted, so that subscriptions start pending),
users with active subscriptions, pending subscriptions (and spare pending and suspended ones for
approve and reactivate), teams, keys; and mints an admin JWT for
`GET /users/me` (an admin API key is no user).
"""

import base64
import hashlib
import hmac
import json
import pathlib
import sys
import time
import urllib.request
import uuid

BASE, ADMIN_KEY, JWT_SECRET, OUT = sys.argv[1:5]
HERE = pathlib.Path(__file__).resolve().parent
RUN = uuid.uuid4().hex[:8]
COUNT = 3


def call(method, path, body=None, credential=ADMIN_KEY):
    req = urllib.request.Request(
        f"{BASE}/api/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {credential}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def jwt(claims):
    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


price = {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}
models = [call("POST", "/models", {"id": f"fuzz-{RUN}-{i}", **price})["id"] for i in range(COUNT)]
restricted = call("POST", "/models", {"id": f"fuzz-{RUN}-restricted", "restricted": True, **price})["id"]
token = jwt({"sub": f"fuzz-admin-{RUN}", "email": f"fuzz-admin-{RUN}@example.com", "email_verified": True,
             "name": "Fuzz admin", "roles": ["admin"], "exp": int(time.time()) + 6 * 3600})
# The JWT's admin is a user too (made at the first call), and holds keys like the others.
admin_user = call("GET", "/users/me", credential=token)["id"]
users = [admin_user] + [call("POST", "/users", {"email": f"fuzz-{RUN}-{i}@example.com", "name": f"Fuzz {i}"})["id"] for i in range(COUNT)]
# A subscription to a restricted model starts pending only when its user asks for it: an
# administrator's is active at once. So users who sign in with a plain JWT ask for their own;
# approve and reactivate get subscriptions of their own, in the states those act on (each call
# consumes one, so there are enough for a run's worth of them).
def plain_user(i):
    return jwt({"sub": f"fuzz-user-{RUN}-{i}", "email": f"fuzz-user-{RUN}-{i}@example.com", "email_verified": True,
                "name": f"Fuzz user {i}", "roles": ["user"], "exp": int(time.time()) + 6 * 3600})


askers = [plain_user(i) for i in range(COUNT)]
for asker in askers:
    users.append(call("GET", "/users/me", credential=asker)["id"])
active = []
for user in users:
    for model in models:
        sub = call("POST", "/subscriptions", {"user_id": user, "model_id": model})
        if sub["status"] == "pending":
            sub = call("POST", f"/subscriptions/{sub['id']}/approve")
        active.append(sub["id"])
more_restricted = [call("POST", "/models", {"id": f"fuzz-{RUN}-restricted-{i}", "restricted": True, **price})["id"]
                   for i in range(COUNT)]
pending = [call("POST", "/subscriptions", {"model_id": restricted}, credential=a)["id"] for a in askers]
to_approve = [call("POST", "/subscriptions", {"model_id": m}, credential=a)["id"] for m in more_restricted for a in askers]
spare = [call("POST", "/models", {"id": f"fuzz-{RUN}-spare-{i}", **price})["id"] for i in range(COUNT)]
suspended = []
for model in spare:
    for user in users:
        sub = call("POST", "/subscriptions", {"user_id": user, "model_id": model})
        suspended.append(call("POST", f"/subscriptions/{sub['id']}/suspend")["id"])
# Budgets (for the budget standings and adjustments): on the teams, and on one key of each user.
teams = [call("POST", "/teams", {"name": f"fuzz-{RUN}-{i}",
                                 "limits": {"max_budget": 1000, "budget_period": "daily"}})["id"] for i in range(COUNT)]
# Plain members with nothing on the teams, for DELETE /teams/{id}/members/{user_id} to remove: each
# removal consumes one, and a phase whose every pick was already removed is all 404s.
extra_members = [call("POST", "/users", {"email": f"fuzz-{RUN}-member-{i}@example.com", "name": f"Member {i}"})["id"]
                 for i in range(8 * COUNT)]
for team in teams:
    for user in users + extra_members:
        call("POST", f"/teams/{team}/members", {"user_id": user})
key_limits = [{}, {"max_budget": 100, "budget_period": "monthly", "rpm": 1000, "tpm": 1000000}]
keys = [call("POST", "/keys", {"user_id": u, "name": f"fuzz-{RUN}", "limits": limits})["id"]
        for u in users for limits in key_limits]

dictionaries = {
    "models": models,
    "all_models": models + [restricted],
    "users": users,
    "subscriptions": active + pending,
    "pending_subscriptions": to_approve,
    "suspended_subscriptions": suspended,
    "teams": teams,
    "members": users + extra_members,
    "keys": keys,
    "future": ["2099-01-01T00:00:00Z", "2100-06-30T12:00:00+02:00"],
}
config = (HERE / "schemathesis.toml").read_text().replace("@ADMIN_JWT@", token)
config += "".join(f"\n[dictionaries.{name}]\nvalues = {json.dumps(ids)}\n" for name, ids in dictionaries.items())
pathlib.Path(OUT).write_text(config)
