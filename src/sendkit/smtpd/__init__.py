"""`sendkit smtpd`: SMTP submission (AUTH with an API key) and the receiver for bounces,
complaints and mailto unsubscribes, in one aiosmtpd server. See `handler.py`."""
