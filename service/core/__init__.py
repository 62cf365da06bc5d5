"""Service core: settings, security, errors, metrics, image decoding and loaded inference sessions."""
