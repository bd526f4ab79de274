# Installed by the fhir-sidecar chart because neither policies.files nor
# policies.existingConfigMap was set: every write is denied (reads are not affected) until the
# security team's policies are installed.
package __POLICY_PACKAGE__

import rego.v1

decision := {"allow": false, "reasons": ["no write policy is installed (set policies.files or policies.existingConfigMap)"]}
