"""The spine router: per request, how the device-KV budget is split across leaves (and when to be exact)."""
