"""What reaches into faust-streaming's and aiokafka's internals: batch consumer, recovery, table stores, outbox."""

from schemas.compiled import attach as _attach

_attach(__name__, __path__)
