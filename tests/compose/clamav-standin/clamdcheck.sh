#!/bin/bash
# The official image's health check, in bash (no nc here): PING over TCP 3310, PONG expected.
if ! exec 3<>/dev/tcp/127.0.0.1/3310 || ! printf 'PING\n' >&3 || ! read -r -t 5 reply <&3 ||
    [[ "$reply" != PONG ]]; then
    echo "ERROR: Unable to contact server"
    exit 1
fi
echo "Clamd is up"
