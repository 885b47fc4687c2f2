{{/* Names, labels, images and the checks values.schema.json cannot express. */}}

{{- define "ftrecipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ftrecipe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ftrecipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ftrecipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ftrecipe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ftrecipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: ftrecipe
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
What must outlive the release and never be pruned: Helm keeps it on uninstall (and when it leaves the
chart), Argo CD neither deletes it with the Application nor prunes it when it leaves Git.
*/}}
{{- define "ftrecipe.keepAnnotations" -}}
helm.sh/resource-policy: keep
argocd.argoproj.io/sync-options: Delete=false,Prune=false
{{- end }}

{{/* A list of strings as a CEL list literal; values.schema.json keeps quotes and backslashes out. */}}
{{- define "ftrecipe.celList" -}}
[{{- range $i, $item := . }}{{ if $i }}, {{ end }}'{{ $item }}'{{- end }}]
{{- end }}

{{- define "ftrecipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ftrecipe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ftrecipe.peeringName" -}}
{{- default (include "ftrecipe.fullname" .) .Values.peering.name }}
{{- end }}

{{/* The operator image: repository@digest when a digest is set, else repository:tag (default appVersion). */}}
{{- define "ftrecipe.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "ftrecipe.dataPreparationImage" -}}
{{- default (include "ftrecipe.image" .) .Values.jobImages.dataPreparation }}
{{- end }}

{{- define "ftrecipe.trainerImage" -}}
{{- default (printf "ghcr.io/ftrecipe/ftrecipe-trainer:%s" .Chart.AppVersion) .Values.jobImages.trainer }}
{{- end }}

{{/* kopf's peering CRDs are needed only with peering on. */}}
{{- define "ftrecipe.installKopfPeeringCRDs" -}}
{{- if and .Values.crds.install .Values.peering.enabled }}true{{- end }}
{{- end }}

{{/* Value combinations the schema cannot check; included by the Deployment so they fail every render. */}}
{{- define "ftrecipe.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) }}
{{- fail (printf "replicaCount is %d but peering.enabled is false: several pods without kopf peering would all handle the same recipes; set peering.enabled=true or replicaCount=1" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.watch.allNamespaces .Values.watch.namespaces }}
{{- fail "watch.namespaces is set while watch.allNamespaces is true: set watch.allNamespaces=false to watch only those namespaces, or empty watch.namespaces" }}
{{- end }}
{{- if and (not .Values.watch.allNamespaces) (not .Values.watch.namespaces) }}
{{- fail "watch.allNamespaces is false and watch.namespaces is empty: list the namespaces to watch" }}
{{- end }}
{{- if and .Values.reuseBundles.credentialsSecret (not .Values.reuseBundles.enabled) }}
{{- fail "reuseBundles.credentialsSecret is set but reuseBundles.enabled is false: the operator needs S3 credentials only to reuse bundles" }}
{{- end }}
{{- if and (not .Values.metrics.service.enabled) .Values.metrics.serviceMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes the metrics Service" }}
{{- end }}
{{- if and .Values.watch.createNamespaces .Values.watch.allNamespaces }}
{{- fail "watch.createNamespaces needs a namespace list: set watch.allNamespaces=false and watch.namespaces" }}
{{- end }}
{{- if and .Values.admissionPolicy.enabled (not .Values.admissionPolicy.allowedImagePrefixes) }}
{{- fail "admissionPolicy.enabled needs admissionPolicy.allowedImagePrefixes, e.g. [registry.example.com/ml/]: an empty allow-list would refuse every recipe that sets spec.images" }}
{{- end }}
{{- if eq (int .Values.operator.healthPort) (int .Values.metrics.port) }}
{{- fail "operator.healthPort and metrics.port must differ" }}
{{- end }}
{{- end }}
