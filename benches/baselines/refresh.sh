#!/usr/bin/env bash
# Baseline: how users refresh tokens today with cron + curl + jq + sqlite3, written plainly.
# Refreshes every credential in DB once, sequentially; the new refresh token is committed
# (sqlite3's default: rollback journal, synchronous=FULL) before moving on, then the token file
# is replaced with a rename.
# usage: refresh.sh DB TOKEN_URL CLIENT_ID CLIENT_SECRET SINK_DIR
set -euo pipefail
db=$1 url=$2 client_id=$3 client_secret=$4 sinks=$5
mapfile -t rows < <(sqlite3 "$db" "SELECT name || ' ' || refresh_token FROM credential ORDER BY name")
for row in "${rows[@]}"; do
    name=${row%% *}
    refresh_token=${row#* }
    answer=$(curl -sS --fail -u "$client_id:$client_secret" \
        -d grant_type=refresh_token --data-urlencode "refresh_token=$refresh_token" "$url")
    access_token=$(jq -r .access_token <<<"$answer")
    new_refresh_token=$(jq -r .refresh_token <<<"$answer")
    expires_in=$(jq -r .expires_in <<<"$answer")
    sqlite3 "$db" "UPDATE credential SET access_token = '$access_token', refresh_token = '$new_refresh_token',
        expires_at = strftime('%s', 'now') + $expires_in WHERE name = '$name'"
    printf '%s' "$access_token" > "$sinks/$name.token.tmp"
    mv "$sinks/$name.token.tmp" "$sinks/$name.token"
done
