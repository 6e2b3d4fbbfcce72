"""Provider receipts, reconciliation runs, anomaly detection and DLQ expiry."""
