"""Operations: the status snapshot, /metrics, the status page, `outpost status`, sd_notify."""
