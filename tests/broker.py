"""The private Mosquitto of the tests lives in :mod:`edge.mosquitto` (fedge sim uses it too)."""

from edge.mosquitto import (
    DEVICE_ACL,
    LOOPBACK,
    BrokerError,
    MosquittoBroker,
    TlsFiles,
    find_mosquitto,
    free_port,
    hash_password,
    make_test_pki,
    write_password_file,
)

__all__ = [
    "DEVICE_ACL",
    "LOOPBACK",
    "BrokerError",
    "MosquittoBroker",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "hash_password",
    "make_test_pki",
    "write_password_file",
]
