"""The input contract, the source readers and the event log (Persona's system of record)."""
