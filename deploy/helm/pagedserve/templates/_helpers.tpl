{{/* Names: <release>-<model name>, cut to 63 characters. */}}
{{- define "pagedserve.modelName" -}}
{{- printf "%s-%s" .root.Release.Name .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pagedserve.labels" -}}
app.kubernetes.io/name: pagedserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pagedserve.modelSelector" -}}
app.kubernetes.io/name: pagedserve
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: engine
pagedserve.io/model: {{ .model.name }}
{{- end -}}

{{/* The model argument of `pagedserve serve` for a model entry. */}}
{{- define "pagedserve.modelPath" -}}
{{- $s := .model.source -}}
{{- if eq $s.type "image" -}}{{ $s.path }}
{{- else if eq $s.type "pvc" -}}/models/{{ $s.path }}
{{- else if eq $s.type "hub" -}}/cache/models/{{ $s.repo }}
{{- else -}}{{ fail (printf "models[%s].source.type must be image, pvc or hub, got %q" .model.name $s.type) }}
{{- end -}}
{{- end -}}

{{/* engineArgs as CLI flags: --key=value; true -> --key; false -> --no-key. */}}
{{- define "pagedserve.engineArgs" -}}
{{- range $k, $v := .model.engineArgs }}
{{- if eq (kindOf $v) "bool" }}
- {{ ternary (printf "--%s" $k) (printf "--no-%s" $k) $v | quote }}
{{- else }}
- {{ printf "--%s=%v" $k $v | quote }}
{{- end }}
{{- end }}
{{- end -}}


{{/* A model entry with every optional key filled in (entries written by `pagedserve plan
--helm-values`, or by hand, may leave them out). */}}
{{- define "pagedserve.model" -}}
{{- $d := dict
  "replicas" 1
  "source" (dict "type" "image" "path" "/opt/models/SmolLM2-135M-Instruct")
  "resources" (dict)
  "gpu" (dict "count" 0 "resource" "nvidia.com/gpu" "product" "")
  "engineArgs" (dict)
  "shutdownTimeout" 30
  "shmSize" "1Gi"
  "nodeSelector" (dict)
  "tolerations" (list)
  "affinity" (dict)
  "podDisruptionBudget" (dict "maxUnavailable" 1)
  "autoscaling" (dict "mode" "none" "minReplicas" 1 "maxReplicas" 4 "targetWaitingRequests" 4
                      "scaleDownStabilizationSeconds" 300
                      "keda" (dict "pollingInterval" 15 "cooldownPeriod" 300
                                   "prometheusAddress" "http://prometheus-operated.monitoring:9090")) -}}
{{- $m := mergeOverwrite (deepCopy $d) (deepCopy .) -}}
{{- if not $m.name }}{{ fail "every entry of models needs a name" }}{{ end -}}
{{- if not $m.servedModelName }}{{ $_ := set $m "servedModelName" $m.name }}{{ end -}}
{{- toYaml $m -}}
{{- end -}}
