/**
 * One error type for every file-format problem. The message always names the file,
 * the tensor or field when there is one, what is wrong, and what the user can do, so
 * it can be shown in the UI as-is.
 */
export class FormatError extends Error {
  readonly file: string;
  readonly item: string | null;
  readonly problem: string;
  readonly hint: string;

  constructor(file: string, item: string | null, problem: string, hint: string) {
    const where = item === null ? file : `${file}, ${item}`;
    super(`${where}: ${problem}. ${hint}`);
    this.name = 'FormatError';
    this.file = file;
    this.item = item;
    this.problem = problem;
    this.hint = hint;
  }
}

export const HINT_REDOWNLOAD = 'The file is damaged or incomplete: re-download it.';
export const HINT_REEXPORT = 'Re-export the file with a standard writer (safetensors, transformers or PEFT).';

/** A value as it would appear in a message, cut short when long. */
export function show(v: unknown): string {
  let s: string;
  try {
    s = typeof v === 'string' ? JSON.stringify(v) : (JSON.stringify(v) ?? String(v));
  } catch {
    s = String(v);
  }
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Accepts already-parsed JSON, a JSON string or UTF-8 bytes. */
export function parseJsonInput(json: unknown, fileName: string): unknown {
  let text: string;
  if (json instanceof Uint8Array) {
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(json);
    } catch {
      throw new FormatError(fileName, null, 'is not valid UTF-8 text', HINT_REDOWNLOAD);
    }
  } else if (typeof json === 'string') {
    text = json;
  } else {
    return json;
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new FormatError(fileName, null, `is not valid JSON (${(e as Error).message})`, HINT_REDOWNLOAD);
  }
}
