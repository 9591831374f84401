/**
 * The model's own tokenizer and chat template, through @huggingface/transformers,
 * built from the tokenizer.json and tokenizer_config.json of a ModelSource (never from
 * the network by itself: the files come from wherever the model does, the cache
 * included). The library is imported on first use so it stays out of the first
 * bundle the page loads.
 */
import { FormatError, isPlainObject, show } from '../formats/errors';
import { LLAMA_SIZE_LIMITS } from '../formats/llama-config';
import type { ModelSource } from './source';

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | (string & {});
  content: string;
}

export interface ChatTemplateOptions {
  /** End with the assistant header so the model answers next (default true). */
  addGenerationPrompt?: boolean;
  /** Llama 3's template prints "Today Date: <date_string>"; fixed here for reproducible prompts. */
  dateString?: string;
}

export interface ChatTokenizer {
  /** Ids of a text; addSpecialTokens (default true) adds what the post-processor adds (Llama 3: <|begin_of_text|>). */
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  decode(ids: readonly number[], options?: { skipSpecialTokens?: boolean }): string;
  /** The chat rendered by the model's template, as text. */
  renderChat(messages: readonly ChatMessage[], options?: ChatTemplateOptions): string;
  /** The rendered chat encoded without added special tokens (the template already emits them). */
  applyChatTemplate(messages: readonly ChatMessage[], options?: ChatTemplateOptions): number[];
  /** The id of a token string (e.g. "<|eot_id|>"), or null. */
  tokenId(token: string): number | null;
  /** Every id that ends an answer: generation_config.json, config.json and the tokenizer's eos token. */
  readonly eosTokenIds: number[];
  readonly bosTokenId: number | null;
  readonly padTokenId: number | null;
  readonly hasChatTemplate: boolean;
}

/** The parts of transformers.js's PreTrainedTokenizer used here. */
interface HfTokenizer {
  encode(text: string, options?: { add_special_tokens?: boolean }): number[];
  decode(ids: number[], options?: { skip_special_tokens?: boolean }): string;
  apply_chat_template(messages: ChatMessage[], options: Record<string, unknown>): unknown;
  get_vocab(): Map<string, number>;
  chat_template: unknown;
  eos_token_id?: number;
  bos_token_id?: number;
  pad_token_id?: number;
  unk_token_id?: number;
  /** The tokenizers-library object underneath; its normalizer (e.g. NFC, Lowercase) is null when the file has none. */
  _tokenizer?: { normalizer?: ((text: string) => string) | null };
}

type HfTokenizerClass = new (tokenizerJson: unknown, tokenizerConfig: unknown) => HfTokenizer;

/** The tokenizer class named by tokenizer_config.json, as AutoTokenizer picks it. */
async function tokenizerClass(config: Record<string, unknown>): Promise<HfTokenizerClass> {
  const lib = (await import('@huggingface/transformers')) as unknown as Record<string, unknown>;
  const base = lib.PreTrainedTokenizer as HfTokenizerClass;
  const name = typeof config.tokenizer_class === 'string' ? config.tokenizer_class.replace(/Fast$/, '') : 'PreTrainedTokenizer';
  const cls = lib[name];
  return typeof cls === 'function' && (cls === base || cls.prototype instanceof base) ? (cls as HfTokenizerClass) : base;
}

function ids(v: unknown): number[] {
  if (typeof v === 'number' && Number.isSafeInteger(v)) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number' && Number.isSafeInteger(x));
  return [];
}

const HINT_TOKENIZER = 'Use the tokenizer.json the model ships, unmodified.';
const HINT_SAME_MODEL = 'Use the tokenizer files that come with these weights: tokenizer.json and config.json must be from the same model.';

/**
 * The model types @huggingface/tokenizers implements. For any other type the library
 * silently builds a placeholder model that encodes every text to no ids.
 */
const TOKENIZER_MODELS = ['BPE', 'WordPiece', 'Unigram'];

/**
 * Checks the structure of tokenizer.json before the library builds anything from it:
 * a model type the library implements, a vocabulary of the right kind, and every id it
 * holds (vocabulary and added tokens) below the model's vocabulary size, so no text can
 * encode to a token the embedding has no row for. Without a model to compare with, ids
 * are held to the largest vocabulary any model may have (a huge id would otherwise
 * make the library build a vocabulary array of that length).
 */
function checkTokenizerJson(json: Record<string, unknown>, model: Record<string, unknown>, vocabSize: number | null): void {
  const fail = (item: string, problem: string, hint = HINT_TOKENIZER): never => {
    throw new FormatError('tokenizer.json', item, problem, hint);
  };
  const type = model.type;
  if (typeof type !== 'string' || !TOKENIZER_MODELS.includes(type)) {
    fail('model.type', `${type === undefined ? 'is missing' : `is ${show(type)}`}; the tokenizer library implements ${TOKENIZER_MODELS.join(', ')} models only`);
  }
  const bound = vocabSize ?? LLAMA_SIZE_LIMITS.vocab_size.max;
  const past = (): string =>
    vocabSize !== null ? `but the model's vocabulary has ${vocabSize} rows (vocab_size), so it has no embedding for that token` : `past any model's vocabulary (at most ${bound} ids)`;
  const checkId = (item: string, token: unknown, id: unknown): void => {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0) fail(item, `gives ${show(token)} the id ${show(id)}, expected a non-negative integer`);
    else if (id >= bound) fail(item, `gives ${show(token)} the id ${id}, ${past()}`, HINT_SAME_MODEL);
  };

  const vocab = model.vocab;
  if (type === 'Unigram') {
    if (!Array.isArray(vocab)) fail('model.vocab', `is ${show(vocab)}, but a Unigram vocabulary is a list of [token, score] pairs`);
    const list = vocab as unknown[];
    list.forEach((entry, i) => {
      if (!Array.isArray(entry) || typeof entry[0] !== 'string' || typeof entry[1] !== 'number') fail('model.vocab', `entry ${i} is ${show(entry)}, expected [token, score]`);
    });
    if (list.length > bound) checkId('model.vocab', (list[bound] as unknown[])[0], bound);
  } else {
    if (!isPlainObject(vocab)) fail('model.vocab', `is ${show(vocab)}, but a ${type} vocabulary is an object mapping each token to its id`);
    for (const [token, id] of Object.entries(vocab as Record<string, unknown>)) checkId('model.vocab', token, id);
    if (type === 'BPE' && model.merges !== undefined && !Array.isArray(model.merges)) fail('model.merges', `is ${show(model.merges)}, expected a list of merges`);
  }

  const added = json.added_tokens ?? [];
  if (!Array.isArray(added)) fail('added_tokens', `is ${show(added)}, expected a list`);
  for (const t of added as unknown[]) {
    if (!isPlainObject(t) || typeof t.content !== 'string') fail('added_tokens', `holds ${show(t)}, expected {"id": ..., "content": ...}`);
    checkId('added_tokens', (t as Record<string, unknown>).content, (t as Record<string, unknown>).id);
  }
}

/**
 * Parses the chat template(s) of tokenizer_config.json with the Jinja engine
 * transformers.js renders them with, so a broken template is refused at load rather
 * than at the first chat. A list of named templates must hold the "default" one, the
 * one the lab renders.
 */
async function checkChatTemplate(template: unknown): Promise<void> {
  if (template === undefined || template === null) return;
  const fail = (item: string, problem: string): never => {
    throw new FormatError('tokenizer_config.json', item, problem, "Use the model's original tokenizer_config.json, or fix the template's Jinja syntax.");
  };
  const { Template } = await import('@huggingface/jinja');
  const parse = (text: string, item: string): void => {
    try {
      new Template(text);
    } catch (e) {
      fail(item, `is not a valid Jinja template (${(e as Error).message})`);
    }
  };
  if (typeof template === 'string') return parse(template, 'chat_template');
  if (!Array.isArray(template)) return fail('chat_template', `is ${show(template)}, expected a Jinja template or a list of named templates`);
  const names: string[] = [];
  for (const entry of template as unknown[]) {
    if (!isPlainObject(entry) || typeof entry.name !== 'string' || typeof entry.template !== 'string') {
      fail('chat_template', `holds ${show(entry)}, expected {"name": ..., "template": ...}`);
    }
    const { name, template: text } = entry as { name: string; template: string };
    parse(text, `chat_template ${JSON.stringify(name)}`);
    names.push(name);
  }
  if (!names.includes('default')) fail('chat_template', `names templates ${names.join(', ')} but none "default", the one chats are rendered with`);
}

/**
 * The text every tokenizer must carry through encode and decode at load: printable
 * ASCII (words, digits, punctuation, single spaces), a line break, a tab, accented
 * Latin letters, CJK characters and a symbol. It avoids what decoders rewrite by
 * design (a leading space, a space before punctuation, which clean_up_tokenization_spaces
 * removes) and uses only NFC-composed characters.
 */
export const TOKENIZER_PROBE = 'Probe 1: 12+34 = 46, "x*y/z" (A-Z a-z)\nline two\tcafé über 数字 ✓';

/**
 * What "lossless" means for the probe:
 * - its printable-ASCII first line decodes to itself exactly: every tokenizer of a text
 *   model holds these characters;
 * - each other character decodes to itself, or the tokenizer marks it as unknown (its
 *   unk token): the char-level micro tokenizer knows only printable ASCII and maps a
 *   line break or "é" to <unk>, visibly lossy by design, while a character that
 *   vanishes or turns into another is refused;
 * - the whole probe, less the characters marked unknown, decodes to itself;
 * - "itself" is up to the tokenizer's own normalizer (e.g. Lowercase, NFC): two texts the
 *   normalizer maps to the same string are the same text to the model.
 */
function checkRoundTrip(
  encode: (text: string) => number[],
  decode: (ids: number[]) => string,
  unknownIds: ReadonlySet<number>,
  normalize: ((text: string) => string) | null,
): void {
  const same = (a: string, b: string): boolean => a === b || (normalize !== null && normalize(a) === normalize(b));
  const roundTrip = (text: string): { ids: number[]; back: string } => {
    const ids = encode(text);
    return { ids, back: ids.length === 0 ? '' : decode(ids) };
  };
  const fail = (problem: string): never => {
    throw new FormatError('tokenizer.json', null, problem, HINT_TOKENIZER);
  };
  const whole = (text: string): void => {
    const { ids, back } = roundTrip(text);
    if (ids.length === 0) fail(`encodes the probe text ${show(text)} to no ids`);
    if (!same(back, text)) fail(`does not decode what it encodes: the probe text ${show(text)} comes back as ${show(back)}`);
  };

  whole(TOKENIZER_PROBE.split('\n')[0]!);
  const unknown = new Set<string>();
  for (const ch of new Set(TOKENIZER_PROBE)) {
    if (/^[\x20-\x7e]$/.test(ch)) continue;
    const text = `a${ch}b`;
    const { ids, back } = roundTrip(text);
    if (same(back, text)) continue;
    if (ids.some((id) => unknownIds.has(id))) {
      unknown.add(ch);
      continue;
    }
    const code = `U+${ch.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}`;
    fail(`loses the character ${show(ch)} (${code}) without an unknown token: ${show(text)} comes back as ${show(back)}`);
  }
  whole([...TOKENIZER_PROBE].filter((ch) => !unknown.has(ch)).join(''));
}

async function optionalJson(source: ModelSource, file: string): Promise<Record<string, unknown> | null> {
  if (!(await source.has(file))) return null;
  const json = await source.readJson(file);
  if (!isPlainObject(json)) throw new FormatError(file, null, 'is not a JSON object', `Use the model's original ${file}.`);
  return json;
}

/**
 * Builds the tokenizer of a source and checks it (see checkTokenizerJson,
 * checkChatTemplate, checkRoundTrip). vocabSize is the row count of the model's
 * embedding, which every id the tokenizer can emit must stay below; by default the
 * vocab_size of the source's config.json (with neither, ids are held to the largest
 * vocabulary a config may state).
 */
export async function loadTokenizer(source: ModelSource, vocabSize?: number): Promise<ChatTokenizer> {
  const tokenizerJson = await source.readJson('tokenizer.json').catch((e: unknown) => {
    if (e instanceof FormatError) throw e;
    throw new FormatError('tokenizer.json', null, `could not be read from ${source.name} (${(e as Error).message})`, 'The lab needs the fast tokenizer file tokenizer.json next to the weights.');
  });
  if (!isPlainObject(tokenizerJson) || !isPlainObject(tokenizerJson.model)) {
    throw new FormatError('tokenizer.json', null, 'is not a tokenizers JSON file (no "model" object)', 'Use the tokenizer.json the model ships (a slow-tokenizer-only repository cannot be used).');
  }
  const tokenizerConfig = (await optionalJson(source, 'tokenizer_config.json')) ?? {};
  const generation = await optionalJson(source, 'generation_config.json');
  const config = await optionalJson(source, 'config.json');
  const configVocab = config?.vocab_size;
  const rows = vocabSize ?? (typeof configVocab === 'number' && Number.isSafeInteger(configVocab) && configVocab > 0 ? configVocab : null);
  checkTokenizerJson(tokenizerJson, tokenizerJson.model, rows);
  await checkChatTemplate(tokenizerConfig.chat_template);
  const Cls = await tokenizerClass(tokenizerConfig);
  let tok: HfTokenizer;
  try {
    tok = new Cls(tokenizerJson, tokenizerConfig);
  } catch (e) {
    throw new FormatError('tokenizer.json', null, `could not be built into a tokenizer (${(e as Error).message})`, 'Use the tokenizer files the model ships, unmodified.');
  }
  const vocab = tok.get_vocab();
  const tokenId = (token: string): number | null => vocab.get(token) ?? null;
  const eos = [...ids(generation?.eos_token_id), ...ids(config?.eos_token_id), ...ids(tok.eos_token_id)];
  const eosTokenIds = [...new Set(eos)];
  const bos = ids(generation?.bos_token_id)[0] ?? ids(config?.bos_token_id)[0] ?? ids(tok.bos_token_id)[0] ?? null;
  const pad = ids(generation?.pad_token_id)[0] ?? ids(config?.pad_token_id)[0] ?? ids(tok.pad_token_id)[0] ?? null;
  const hasChatTemplate = tok.chat_template !== undefined && tok.chat_template !== null;

  const renderChat = (messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string => {
    if (!hasChatTemplate) {
      throw new FormatError('tokenizer_config.json', 'chat_template', 'is missing, so this model has no chat format', 'Pick an instruction-tuned (chat) model, e.g. one whose name ends in -Instruct.');
    }
    const kwargs: Record<string, unknown> = { tokenize: false, add_generation_prompt: options.addGenerationPrompt ?? true };
    if (options.dateString !== undefined) kwargs.date_string = options.dateString;
    const text = tok.apply_chat_template(messages.map((m) => ({ role: m.role, content: m.content })), kwargs);
    if (typeof text !== 'string') throw new Error('chat template did not render to text');
    return text;
  };
  const encode = (text: string, options: { addSpecialTokens?: boolean } = {}): number[] =>
    tok.encode(text, { add_special_tokens: options.addSpecialTokens ?? true });
  const { unk_token: unkToken, unk_id: unkId } = tokenizerJson.model;
  checkRoundTrip(
    (text) => encode(text, { addSpecialTokens: false }),
    (list) => tok.decode(list, { skip_special_tokens: false }),
    new Set(ids([tok.unk_token_id, typeof unkToken === 'string' ? vocab.get(unkToken) : undefined, unkId])),
    tok._tokenizer?.normalizer ?? null,
  );

  return {
    encode,
    decode: (list, options = {}) => (list.length === 0 ? '' : tok.decode([...list], { skip_special_tokens: options.skipSpecialTokens ?? false })),
    renderChat,
    applyChatTemplate: (messages, options = {}) => encode(renderChat(messages, options), { addSpecialTokens: false }),
    tokenId,
    eosTokenIds,
    bosTokenId: bos,
    padTokenId: pad,
    hasChatTemplate,
  };
}
