"""Key-customer alerts: what to alert on (``policy``), the HTTP sinks (``sinks``), delivery (``delivery``)."""
