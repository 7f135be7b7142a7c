"""Baseline: how users refresh tokens today with a Python script (requests + sqlite3), written
plainly. Refreshes every credential in DB once, sequentially; the new refresh token is committed
(sqlite3 default: rollback journal, synchronous=FULL) before moving on, then the token file is
replaced with a rename.

usage: refresh.py DB TOKEN_URL CLIENT_ID CLIENT_SECRET SINK_DIR
"""
import os
import sqlite3
import sys
import time

import requests


def main():
    db, url, client_id, client_secret, sinks = sys.argv[1:6]
    conn = sqlite3.connect(db)
    session = requests.Session()
    rows = conn.execute("SELECT name, refresh_token FROM credential ORDER BY name").fetchall()
    for name, refresh_token in rows:
        r = session.post(
            url,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(client_id, client_secret),
            timeout=30,
        )
        r.raise_for_status()
        answer = r.json()
        conn.execute(
            "UPDATE credential SET access_token = ?, refresh_token = ?, expires_at = ? WHERE name = ?",
            (answer["access_token"], answer["refresh_token"], int(time.time()) + int(answer["expires_in"]), name),
        )
        conn.commit()
        tmp = os.path.join(sinks, name + ".token.tmp")
        with open(tmp, "w") as f:
            f.write(answer["access_token"])
        os.replace(tmp, os.path.join(sinks, name + ".token"))


if __name__ == "__main__":
    main()
