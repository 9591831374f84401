/**
 * The model's own tokenizer and chat template, through @huggingface/transformers,
 * built from the tokenizer.json and tokenizer_config.json of a ModelSource (never from
 * the network by itself: the files come from wherever the model does, the cache
 * included). The library is imported on first use so it stays out of the first
 * bundle the page loads.
 */
import { FormatError, isPlainObject } from '../formats/errors';
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

async function optionalJson(source: ModelSource, file: string): Promise<Record<string, unknown> | null> {
  if (!(await source.has(file))) return null;
  const json = await source.readJson(file);
  if (!isPlainObject(json)) throw new FormatError(file, null, 'is not a JSON object', `Use the model's original ${file}.`);
  return json;
}

export async function loadTokenizer(source: ModelSource): Promise<ChatTokenizer> {
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
