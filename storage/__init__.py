"""Durable storage of received instances (spool) and the job ledger."""
