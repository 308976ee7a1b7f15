// ESLint (flat config): typescript-eslint's type-checked recommended rules over Aeterna's TypeScript, plus the rules
// that guard what the project depends on. Formatting is Prettier's (.prettierrc.json): no rule here formats.
import { defineConfig } from 'eslint/config';
import tseslint from 'typescript-eslint';

export default defineConfig(
  { ignores: ['dist/', 'build/', 'node_modules/', 'prebuilds/', 'examples/', 'clients/'] },
  {
    files: ['src/**/*.ts', 'test/**/*.ts', 'bench/**/*.ts', 'scripts/**/*.ts'],
    extends: [tseslint.configs.recommendedTypeChecked],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      // The project's convention (tsc's noUnusedLocals agrees): a leading underscore marks a name kept on purpose.
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrorsIgnorePattern: '^_', ignoreRestSiblings: true },
      ],
      // An async function without await is how this code keeps a Promise-returning interface whose throws become
      // rejections; dropping the async would change when an error surfaces.
      '@typescript-eslint/require-await': 'off',
      // Passing on what a catch caught (unknown) is forwarding an error, not making one up.
      '@typescript-eslint/prefer-promise-reject-errors': ['error', { allowThrowingUnknown: true }],
      // node:test's test() and describe() return promises the runner itself awaits.
      '@typescript-eslint/no-floating-promises': [
        'error',
        {
          allowForKnownSafeCalls: [
            { from: 'package', package: 'node:test', name: ['test', 'it', 'describe', 'suite', 'before', 'after'] },
          ],
        },
      ],
    },
  },
  {
    // The supervisor spawns only through the addon (fork and exec with async-signal-safe calls in between, every fd
    // close-on-exec, its reaper the only one to wait). child_process children would be reaped by libuv behind the
    // reaper's back. The client SDK (src/client/) runs inside the app and may use it.
    files: ['src/**/*.ts'],
    ignores: ['src/client/**'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          paths: [
            {
              name: 'child_process',
              message: 'The supervisor spawns through the addon (src/native), never child_process.',
            },
            {
              name: 'node:child_process',
              message: 'The supervisor spawns through the addon (src/native), never child_process.',
            },
          ],
        },
      ],
      // The same for import() (require() is already refused everywhere by no-require-imports).
      'no-restricted-syntax': [
        'error',
        {
          selector: 'ImportExpression[source.value=/^(node:)?child_process$/]',
          message: 'The supervisor spawns through the addon (src/native), never child_process.',
        },
      ],
    },
  },
);
