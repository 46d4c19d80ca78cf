"""Usage accounting: Envoy's access logs in, TPM reconciliation, quotas and the billing ledger."""
