"""The site's runtime, above the federated client, training and privacy: the site engine and
service, the control socket, the training worker and its executors, the admin interface and its
request processors, the site's paths and policy, and the MMAR checks.

Import the module you need (``engine.site.paths``, ``engine.site.site_service``, ...): this
package imports nothing itself, so no part of it pays for another's imports.
"""
