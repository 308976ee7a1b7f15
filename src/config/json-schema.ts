// Derives a JSON Schema (draft 2020-12) from the config Spec, for editors
// (yaml-language-server and friends): completion, descriptions, basic checks.
// What JSON Schema cannot say (duration bounds, uniqueness, mode-dependent keys)
// is in the descriptions; the loader remains the authority.

import { HOST_PORT_PATTERN, LISTEN_ADDRESS_PATTERN } from './address';
import { DURATION_PATTERN, formatDuration } from './duration';
import { configSchema } from './schema';
import { formatSize, SIZE_PATTERN } from './size';
import { ACCOUNT_ID_MAX, ACCOUNT_NAME_PATTERN, FILE_MODE_PATTERN, type Spec } from './spec';

export type JsonSchema = { [keyword: string]: unknown };

/** The JSON Schema of aeterna.yaml, as committed in configs/aeterna.schema.json. */
export function configJsonSchema(): JsonSchema {
  return {
    $schema: 'https://json-schema.org/draft/2020-12/schema',
    title: 'Aeterna configuration',
    ...toJsonSchema(configSchema),
  };
}

export function toJsonSchema(spec: Spec, defaultValue?: unknown): JsonSchema {
  const schema: JsonSchema = { description: spec.description + rangeNote(spec), ...shapeOf(spec) };
  if (defaultValue !== undefined) schema['default'] = defaultValue;
  if (spec.example !== undefined) schema['examples'] = [spec.example];
  return schema;
}

function shapeOf(spec: Spec): JsonSchema {
  switch (spec.kind) {
    case 'string':
      return {
        type: 'string',
        ...(spec.allowEmpty ? {} : { minLength: 1 }),
        ...(spec.maxLength === undefined ? {} : { maxLength: spec.maxLength }),
        ...(spec.pattern === undefined ? {} : { pattern: spec.pattern }),
      };
    case 'enum':
      return { type: 'string', enum: [...spec.values] };
    case 'integer':
      return { type: 'integer', minimum: spec.minimum, maximum: spec.maximum };
    case 'boolean':
      return { type: 'boolean' };
    case 'duration':
      return {
        type: 'string',
        pattern: DURATION_PATTERN,
        minLength: 2,
      };
    case 'size':
      return {
        anyOf: [
          { type: 'integer', minimum: spec.minimumBytes, maximum: spec.maximumBytes },
          { type: 'string', pattern: SIZE_PATTERN },
        ],
      };
    case 'list':
      return {
        type: 'array',
        items: toJsonSchema(spec.items),
        ...(spec.minItems > 0 ? { minItems: spec.minItems } : {}),
      };
    case 'object': {
      const properties: Record<string, JsonSchema> = {};
      const required: string[] = [];
      for (const [name, field] of Object.entries(spec.fields)) {
        properties[name] = toJsonSchema(field.spec, field.presence === 'default' ? field.value : undefined);
        if (field.presence === 'required') required.push(name);
      }
      return { type: 'object', properties, ...(required.length > 0 ? { required } : {}), additionalProperties: false };
    }
    case 'listenAddress':
      return { type: 'string', pattern: LISTEN_ADDRESS_PATTERN };
    case 'hostPort':
      return { type: 'string', pattern: HOST_PORT_PATTERN };
    case 'socketPath':
    case 'directory':
    case 'path':
      return { type: 'string', minLength: 1 };
    case 'account':
      return {
        anyOf: [
          { type: 'string', pattern: ACCOUNT_NAME_PATTERN },
          { type: 'string', pattern: '^[0-9]+$' },
          { type: 'integer', minimum: 0, maximum: ACCOUNT_ID_MAX },
        ],
      };
    case 'fileMode':
      return { type: 'string', pattern: FILE_MODE_PATTERN };
  }
}

/** Bounds a pattern cannot carry, stated where editors show them. */
function rangeNote(spec: Spec): string {
  if (spec.kind === 'duration')
    return ` Range: ${formatDuration(spec.minimumMs)} to ${formatDuration(spec.maximumMs)}.`;
  if (spec.kind === 'size') return ` Range: ${formatSize(spec.minimumBytes)} to ${formatSize(spec.maximumBytes)}.`;
  return '';
}
